"""One training checkpoint that resumes in either framework: model parameters, optimizer state
and precision state in one safetensors file (see docs/checkpoints.md)::

    from dualprec_torch.checkpoint import save_training, load_training
    save_training("run/step5.safetensors", model, optimizer, precision)
    load_training("run/step5.safetensors", model, optimizer, precision)   # or in JAX:
    # params, opt_state = dualprec_jax.checkpoint.load_training(path, params, opt_state, prec)

Parameters are stored under their torch names in torch layout; optimizer state as torch
names its slots (Adam/AdamW ``exp_avg``, ``exp_avg_sq`` and one step count; SGD's
``momentum_buffer``).  Optimizers whose state has no optax twin are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from dualprec import checkpoint
from dualprec.errors import CheckpointError

__all__ = ["save_training", "load_training", "optimizer_state", "load_optimizer_state"]

_ADAMS = (torch.optim.Adam, torch.optim.AdamW)


def _kind(optimizer) -> str:
    if isinstance(optimizer, _ADAMS):
        if any(g.get("amsgrad") for g in optimizer.param_groups):
            raise CheckpointError("save_training: Adam with amsgrad=True keeps max_exp_avg_sq, which optax's "
                                  "adam/adamw have no slot for; it cannot cross frameworks")
        return "adam"
    if type(optimizer) is torch.optim.SGD:
        return "sgd" if any(g.get("momentum", 0) for g in optimizer.param_groups) else "none"
    raise CheckpointError(f"a training checkpoint maps torch.optim.Adam, AdamW and SGD (with or without momentum) "
                          f"to optax's adam, adamw and sgd; {type(optimizer).__module__}.{type(optimizer).__name__} "
                          "has no mapping (save its state_dict() with torch.save instead)")


def _names(model: torch.nn.Module, precision=None) -> dict[int, str]:
    """id(tensor) -> parameter name, for the model's parameters and their float32 masters."""
    names = {id(p): n for n, p in model.named_parameters()}
    for record in getattr(precision, "_records", {}).values():
        masters = getattr(record, "masters", None)
        for p, master in getattr(masters, "pairs", ()):
            if id(p) in names:
                names[id(master)] = names[id(p)]
    return names


def _optimized(model, optimizer, precision) -> list[tuple[str, torch.Tensor]]:
    names = _names(model, precision)
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("save_training: the optimizer updates a tensor that is not a parameter of the "
                                      "model (pass the model the optimizer was built from)")
            out.append((names[id(p)], p))
    return out


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision=None) -> dict:
    """The backend-neutral optimizer state: ``{"kind", "step", "slots": {slot: {name: array}}}``."""
    kind = _kind(optimizer)
    slots = {s: {} for s in checkpoint.OPTIMIZER_SLOTS[kind]}
    steps = set()
    for name, p in _optimized(model, optimizer, precision):
        state = optimizer.state.get(p, {})
        for s in slots:
            if state.get(s) is not None:
                slots[s][name] = state[s].detach().cpu()
        if "step" in state:
            steps.add(int(float(state["step"])))
    if len(steps) > 1:
        raise CheckpointError(f"save_training: the parameters have taken different numbers of Adam steps "
                              f"({sorted(steps)}); optax keeps one count for all of them")
    return {"kind": kind, "step": steps.pop() if steps else 0, "slots": slots}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Mapping,
                         precision=None, *, strict: bool = True) -> None:
    """Put a backend-neutral optimizer state into ``optimizer`` (state keyed by name)."""
    kind = _kind(optimizer)
    if state["kind"] != kind and not {state["kind"], kind} <= {"sgd", "none"}:
        raise CheckpointError(f"load_training: the checkpoint holds {state['kind']} optimizer state, this "
                              f"{type(optimizer).__name__} keeps {kind} state")
    params = dict(_optimized(model, optimizer, precision))
    saved = set().union(*(set(v) for v in state["slots"].values())) if state["slots"] else set()
    unexpected = sorted(saved - set(params))
    if strict and unexpected:
        raise CheckpointError(f"load_training: optimizer state for {unexpected}, which this optimizer does not update")
    step = int(state["step"])
    for name, p in params.items():
        new = {}
        for slot in checkpoint.OPTIMIZER_SLOTS[kind]:
            value = state["slots"].get(slot, {}).get(name)
            if value is None:
                continue
            value = torch.as_tensor(np.array(value))
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"load_training: {slot} of {name} has shape {tuple(value.shape)} in the "
                                      f"checkpoint, {tuple(p.shape)} here")
            new[slot] = value.to(device=p.device, dtype=p.dtype)
        if kind == "adam" and step > 0:
            old = optimizer.state.get(p, {}).get("step")
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            on_device = group.get("capturable") or group.get("fused")
            dtype = old.dtype if isinstance(old, torch.Tensor) else torch.float32
            device = old.device if isinstance(old, torch.Tensor) else (p.device if on_device else "cpu")
            new["step"] = torch.tensor(float(step), dtype=dtype, device=device)
            for slot in checkpoint.OPTIMIZER_SLOTS[kind]:
                new.setdefault(slot, torch.zeros_like(p, memory_format=torch.preserve_format))
        optimizer.state.pop(p, None)
        if new:
            optimizer.state[p] = new


def save_training(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision) -> None:
    """Write model parameters (torch names and layout), the optimizer state and the precision
    state to one checksummed safetensors file that `load_training` here or in
    `dualprec_jax.checkpoint` resumes."""
    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    checkpoint.save_training_file(path, params, optimizer_state(model, optimizer, precision),
                                  precision.state_dict())


def load_training(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision, *,
                  strict: bool = True) -> None:
    """Resume from `save_training`'s file (written by either backend) in place: parameters,
    optimizer state, then the precision state (loss scale, masters, extensions).  ``model``,
    ``optimizer`` and ``precision`` are set up as for training (``precision.setup`` done)."""
    data = checkpoint.load_training_file(path)
    here = dict(model.named_parameters())
    missing, unexpected = sorted(set(here) - set(data["params"])), sorted(set(data["params"]) - set(here))
    if strict and (missing or unexpected):
        raise CheckpointError(f"load_training: parameters missing in the checkpoint: {missing or 'none'}; not in "
                              f"this model: {unexpected or 'none'} (JAX writes torch names: pass names= there)")
    with torch.no_grad():
        for name, p in here.items():
            if name not in data["params"]:
                continue
            value = torch.as_tensor(np.array(data["params"][name])) if data["params"][name].dtype.name != "bfloat16" \
                else torch.from_numpy(np.array(data["params"][name]).view(np.int16)).view(torch.bfloat16)
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"load_training: parameter {name} has shape {tuple(value.shape)} in the "
                                      f"checkpoint, {tuple(p.shape)} here")
            p.copy_(value.to(p.dtype))
    load_optimizer_state(model, optimizer, data["optimizer"], precision, strict=strict)
    precision.load_state_dict(data["precision"], strict=strict)
