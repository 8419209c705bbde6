"""`diagnose`: which modules of a torch model break under a policy, and the policy that
fixes them (the search and the report type are the spec layer's: `dualprec.diagnose`).

    report = diagnose(model, (x, y), "16-mixed", loss_fn=F.cross_entropy, target=0.05)
    report.render()            # a table at 80 columns
    print(report.suggested)    # a policy string both backends accept

Every run trains a deep copy of ``model`` (left untouched) for ``steps`` SGD steps through
`Precision` (setup, autocast, backward, unscale_, step), so loss scaling, master weights,
quantized and FP8 layers behave as in training.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualprec import Policy
from dualprec.diagnose import DEFAULT_TARGET, DiagnoseReport, Trace, search

from .precision import Precision

__all__ = ["diagnose", "runner"]

#: retries of a step whose scaled gradients overflowed (dynamic loss scaling backs off each time)
MAX_RETRIES = 24


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).cpu().numpy().copy()


def default_loss(out, y):
    """Cross entropy over the last axis of ``out`` with integer labels ``y``."""
    out = out if out.dtype in (torch.float32, torch.float64) else out.float()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _batches(batch, steps: int) -> list[tuple]:
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], (torch.Tensor, np.ndarray)):
        batch = [batch]
    batch = list(batch)
    if not batch:
        raise ValueError("diagnose: batch is empty; pass (inputs, targets) or a list of them, one per step")
    out = []
    for i in range(steps):
        x, y = batch[i % len(batch)]
        out.append(tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in (x, y)))
    return out


def runner(model: nn.Module, batch, *, loss_fn: Callable | None = None, steps: int = 3, lr: float = 1e-2,
           seed: int = 0) -> Callable[[Policy, bool], Trace]:
    """``run(policy, capture) -> Trace`` for `dualprec.diagnose.search`: ``steps`` SGD steps of a
    deep copy of ``model`` under ``policy``."""
    loss_fn = loss_fn or default_loss
    batches = _batches(batch, steps)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("diagnose: the model's parameters must be float32 (the weights every run starts from); "
                         "build it without a Precision, or call .float() first")

    def run(policy: Policy, capture: bool) -> Trace:
        t0 = time.perf_counter()
        prec = Precision(policy)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        with warnings.catch_warnings():  # "no nn.Linear under an FP8 recipe" once every layer is promoted
            warnings.simplefilter("ignore", UserWarning)
            m, opt = prec.setup(m, opt)
        names = [n for n, p in m.named_parameters() if p.requires_grad and p.is_floating_point()]
        params = [p for g in opt.param_groups for p in g["params"]]
        outputs: list[dict] = []
        hooks = []
        if capture:
            def hook(mod, inp, out, name):
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    outputs[-1][name] = _np(out)
            hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
                     for n, mod in m.named_modules() if n]
        tr = Trace([], [], [], [])
        dynamic = policy.loss_scale.kind == "dynamic"
        rng = torch.random.fork_rng()
        rng.__enter__()
        torch.manual_seed(seed)  # dropout draws the same masks in every run
        try:
            for x, y in batches:
                for retry in range(MAX_RETRIES + 1):
                    outputs.append({})
                    opt.zero_grad(set_to_none=True)
                    with prec.autocast():
                        out = m(prec.convert_input(x))
                        loss = loss_fn(out, y)
                    scale = float(prec.scale) if policy.loss_scale.enabled else 1.0
                    prec.backward(loss)
                    prec.unscale_(opt)
                    grads = {n: _np(p.grad) for n, p in zip(names, params) if p.grad is not None}
                    stepped = bool(prec.step(opt))
                    value = float(loss.detach().float())
                    if stepped or not dynamic or not np.isfinite(value) or retry == MAX_RETRIES:
                        break
                    outputs.pop()  # retried at the backed-off scale: the weights did not move
                tr.grads.append(grads)
                tr.losses.append(value)
                tr.scales.append(scale)
                tr.skipped.append(not stepped)
                tr.retries.append(retry)
        finally:
            rng.__exit__(None, None, None)
            for h in hooks:
                h.remove()
        tr.outputs = outputs if capture else None
        tr.seconds = time.perf_counter() - t0
        return tr

    return run


def linear_weights(model: nn.Module) -> dict[str, tuple[str, np.ndarray]]:
    """Module path -> (parameter name, float32 weight [out, in]) of each nn.Linear."""
    return {n: (f"{n}.weight", m.weight.detach().float().numpy().copy())
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def diagnose(model: nn.Module, batch, policy, *, loss_fn: Callable | None = None, steps: int = 3,
             target: float = DEFAULT_TARGET, lr: float = 1e-2, candidates: Sequence[str] | None = None,
             gains: bool = True, name: str | None = None, log: Callable[[str], None] | None = None
             ) -> DiagnoseReport:
    """Which modules of ``model`` (float32, on its device) break under ``policy``, ranked, and
    the policy with the fewest promotions that brings the error under ``target``.

    ``batch``: (inputs, targets) or a list of them (one per step, cycled).  ``loss_fn(output,
    targets)``: default cross entropy over the output's last axis.  ``steps`` SGD steps at
    ``lr`` from the same weights in every run.  See `dualprec.diagnose.search` for
    ``candidates`` and ``gains``; the result is a `dualprec.diagnose.DiagnoseReport`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose(model, ...): expected a torch.nn.Module, got {type(model).__name__}")
    if steps < 1:
        raise ValueError(f"diagnose: steps={steps} must be at least 1")
    policy = Policy.parse(policy)
    modules = [(n, type(m).__name__) for n, m in model.named_modules() if n]
    run = runner(model, batch, loss_fn=loss_fn, steps=steps, lr=lr)
    return search(run, policy, modules, target=target, backend="torch", model=name or type(model).__name__,
                  steps=steps, weights=linear_weights(model), candidates=candidates, gains=gains, log=log)
