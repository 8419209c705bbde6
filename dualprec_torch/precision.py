"""`Precision`: carry one dualprec Policy out in a torch training loop.

Worked example (any string `Policy.parse` takes works in place of "16-mixed")::

    precision = Precision("16-mixed")
    with precision.init_module():
        model = Net()
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = precision.setup(model, optimizer)
    for x, y in data:
        optimizer.zero_grad()
        with precision.autocast():
            out = model(precision.convert_input(x))
            loss = loss_fn(out, y)            # losses, softmax and norms run in float32
        precision.backward(loss)               # loss * scale, then backward
        precision.unscale_(optimizer)          # optional: to clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        took_step = precision.step(optimizer)  # skipped when a gradient is inf/NaN
        precision.update()                     # optional, see below
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "precision": precision.state_dict()}, path)

This is GradScaler's loop, state for state: `step` unscales (unless `unscale_` did) and
steps or skips one optimizer; `update` advances the loss scale once per iteration from the
flags of every optimizer unscaled since the last update.  `update` may be left out: it runs
by itself at the next `backward`, `state_dict` or read of `scale` / `loss_scale` once every
optimizer given to `setup` has stepped.  With several optimizers that do not all step every
iteration, call `update()` at the end of each iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dualprec import Policy, PolicyError
from dualprec.errors import UnsupportedPolicyError

from .caps import device_caps
from .casts import cast_floating, torch_dtype
from .init import init_context
from .loss_scale import LossScaler
from .master import MasterWeights
from . import fp8
from . import quant
from .modules import convert_module
from .ops import compute_context

__all__ = ["Precision", "UnsupportedPolicyError"]

STATE_FORMAT = "dualprec_torch.Precision"
STATE_VERSION = 1


def _check_supported(policy: Policy) -> None:
    for where, p in [("", policy)] + [(f" (override @{pat})", sub) for pat, sub in policy.overrides]:
        if p.is_mixed and p.compute_dtype not in ("bfloat16", "float16"):
            raise UnsupportedPolicyError(
                f'"{policy}"{where}: params={p.param_dtype} with compute={p.compute_dtype} needs an '
                "autocast to a wide dtype, which torch does not have (autocast computes in bfloat16 "
                "or float16); use params=compute for a single-dtype policy")


@dataclass(eq=False)
class _OptimizerRecord:
    optimizer: torch.optim.Optimizer
    masters: MasterWeights | None
    stage: str = "ready"  # ready -> unscaled -> stepped -> (update) ready
    found_inf: dict = field(default_factory=dict)


class Precision:
    """One Policy, carried out in torch.  See the module docstring for the training loop."""

    def __init__(self, policy, device=None):
        self._policy = Policy.parse(policy)
        _check_supported(self._policy)
        self._device = None if device is None else torch.device(device)
        self._device_type = self._device.type if self._device is not None else None
        self._scaler = LossScaler(self._policy.loss_scale)
        self._records: dict[int, _OptimizerRecord] = {}
        self._names: dict[int, str] = {}
        self._scaled_backward = False  # precision.backward ran since the last update
        self._pending = False          # an optimizer stepped since the last update

    # ----- policy and device ----------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def device_type(self) -> str:
        if self._device_type is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self._device_type

    def check(self, device=None):
        """`policy.check` on this device's capabilities: a `dualprec.CheckReport`."""
        return self._policy.check(device_caps(device if device is not None else self._device))

    def __repr__(self) -> str:
        return f'Precision("{self._policy}")'

    # ----- modules ----------------------------------------------------------------------
    def init_module(self, empty_init: bool = False):
        """Context: modules created inside get the param dtype (and device) directly."""
        return quant.module_init_context(self._policy, self._device, self.device_type, empty_init)

    def convert_module(self, model: nn.Module) -> nn.Module:
        """Cast ``model`` to the policy in place (per-module overrides included)."""
        if self._device_type is None:
            first = next(iter(model.parameters()), None)
            if first is not None:
                self._device_type = first.device.type
        for name, p in model.named_parameters():
            self._names.setdefault(id(p), name)
        if quant.uses_quantization(self._policy):  # Linear -> bitsandbytes layers, quantized
            quant.quantize_module(model, self._policy, self._device)
        fp8.convert_module(model, self._policy)  # first: its int32 state buffers ignore the casts
        return convert_module(model, self._policy, self.device_type)

    def setup(self, model: nn.Module, *optimizers: torch.optim.Optimizer):
        """Convert ``model`` and adopt ``optimizers``; returns the model, or (model, *optimizers)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"setup(model, *optimizers): model must be an nn.Module, got {type(model).__name__}")
        model_params = {id(p) for p in model.parameters()}
        self.convert_module(model)
        for opt in optimizers:  # quantization replaced Linear weights: point the optimizers at the new ones
            quant.rebind_optimizer(opt, model)
        model_params |= {id(p) for p in model.parameters()}
        for opt in optimizers:
            self._adopt(opt, model_params)
        return model if not optimizers else (model, *optimizers)

    def _adopt(self, opt, model_params: set[int]) -> None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"setup(model, *optimizers): expected torch.optim.Optimizer, got {type(opt).__name__}")
        if id(opt) in self._records:
            return
        if isinstance(opt, torch.optim.LBFGS) and self._scaler.enabled:
            raise TypeError("LBFGS re-evaluates the loss in step(closure), which loss scaling cannot see; "
                            "use another optimizer or a policy without loss scaling")
        foreign = [p for g in opt.param_groups for p in g["params"] if id(p) not in model_params]
        if foreign:
            raise ValueError(f"setup(): the optimizer holds {len(foreign)} parameter(s) that are not in the "
                             "model passed with it; build the optimizer from model.parameters()")
        masters = MasterWeights(opt) if self._policy.master_weights else None
        self._records[id(opt)] = _OptimizerRecord(opt, masters)

    # ----- forward ----------------------------------------------------------------------
    def autocast(self):
        """Context for forward and loss: autocast to the compute dtype with float32 norms,
        softmax, reductions and losses (mixed policies); the compute dtype as default dtype
        ("-true" policies)."""
        return compute_context(self._policy, self.device_type)

    def convert_input(self, data):
        """Floating tensors in ``data`` (nested) cast to the compute dtype."""
        return cast_floating(data, torch_dtype(self._policy.compute_dtype))

    def convert_output(self, data):
        """Floating tensors in ``data`` (nested) cast to the output dtype."""
        return cast_floating(data, torch_dtype(self._policy.output_dtype))

    # ----- backward and the optimizer step ------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``(loss * scale).backward(**kwargs)``; plain backward without loss scaling."""
        self._auto_update()
        if self._scaler.enabled:
            loss = self._scaler.scale_loss(loss)
        loss.backward(**kwargs)
        self._scaled_backward = True

    def _record(self, optimizer) -> _OptimizerRecord:
        record = self._records.get(id(optimizer))
        if record is None or record.optimizer is not optimizer:
            raise ValueError("this optimizer was not passed to setup(); call "
                             "model, optimizer = precision.setup(model, optimizer) before training")
        return record

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale ``optimizer``'s gradients in place (for clipping) and note whether they are
        finite.  With master weights the gradients move onto the float32 copies first."""
        record = self._record(optimizer)
        if record.stage == "stepped":
            self._auto_update()  # a new iteration when every optimizer has stepped
        if record.stage == "unscaled":
            raise RuntimeError("unscale_() was already called for this optimizer in this iteration")
        if record.stage == "stepped":
            raise RuntimeError("unscale_() after step() for this optimizer while other optimizers have not "
                               "stepped: call precision.update() at the end of each iteration")
        if self._scaler.enabled and not self._scaled_backward:
            raise RuntimeError("step()/unscale_() before backward(): call precision.backward(loss) first "
                               "(with loss scaling on, loss.backward() alone leaves the gradients scaled "
                               "by nothing and the step would be wrong)")
        if record.masters is not None:
            record.masters.move_grads()
        grads = self._grads(optimizer)
        if not grads:
            raise RuntimeError("step()/unscale_() before backward(): no parameter of this optimizer has a "
                               "gradient; call precision.backward(loss) first")
        if self._scaler.enabled:
            record.found_inf = self._scaler.unscale_(grads)
        record.stage = "unscaled"

    def _grads(self, optimizer) -> list[torch.Tensor]:
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._scaler.enabled and p.grad.dtype == torch.float16:
                    name = self._names.get(id(p), "a parameter")
                    raise PolicyError(f"loss scaling cannot unscale float16 gradients ({name} is float16): "
                                      "keep float32 params (16-mixed) or add master=true to the policy")
                if p.grad.is_sparse:
                    grads.append(p.grad._values())
                else:
                    grads.append(p.grad)
        return grads

    def step(self, optimizer: torch.optim.Optimizer, **kwargs) -> bool:
        """Unscale (unless done) and step ``optimizer``; skip the step when a gradient is not
        finite.  Returns whether the step was taken."""
        record = self._record(optimizer)
        if record.stage == "stepped":
            self._auto_update()  # a new iteration when every optimizer has stepped
        if record.stage == "stepped":
            raise RuntimeError("step() was already called for this optimizer since the last update; call "
                               "precision.update() at the end of each iteration (needed when several "
                               "optimizers do not all step every iteration)")
        if record.stage == "ready":
            self.unscale_(optimizer)
        finite = all(f.item() == 0 for f in record.found_inf.values())
        if finite:
            optimizer.step(**kwargs)
            if record.masters is not None:
                record.masters.copy_to_model()
        record.stage = "stepped"
        self._pending = True
        return finite

    def update(self) -> None:
        """Advance the loss scale once for this iteration (a no-op when nothing stepped)."""
        if not self._pending:
            return
        found = [f for r in self._records.values() if r.stage != "ready" for f in r.found_inf.values()]
        self._scaler.update(found)
        for r in self._records.values():
            r.stage, r.found_inf = "ready", {}
        self._pending = False
        self._scaled_backward = False

    def _auto_update(self) -> None:
        if self._pending and all(r.stage == "stepped" for r in self._records.values()):
            self.update()

    # ----- state ------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without loss scaling)."""
        self._auto_update()
        return self._scaler.scale

    @property
    def loss_scale(self):
        """The loss-scale state as the reference's `LossScaleState` (scale, counter)."""
        from dualprec.ref.loss_scale import LossScaleState
        import numpy as np

        self._auto_update()
        return LossScaleState(scale=np.float32(self._scaler.scale), counter=self._scaler.counter)

    def state_dict(self) -> dict:
        """Policy, loss-scale state and (master=true) the float32 master weights."""
        self._auto_update()
        if self._pending:
            raise RuntimeError("state_dict() in the middle of an iteration (some optimizers stepped, others "
                               "not): call precision.update() first")
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "policy": str(self._policy),
                 "loss_scale": self._scaler.state_dict()}
        if self._policy.master_weights:
            state["master_weights"] = [r.masters.state_dict() for r in self._records.values()]
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore `state_dict()`.  ``strict``: the saved policy must equal this one."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            hint = (" (this looks like a torch.amp.GradScaler state dict: load it with "
                    "precision.load_grad_scaler_state(...))" if isinstance(state, dict) and "_growth_tracker" in state
                    else "")
            raise PolicyError(f"not a dualprec_torch Precision state dict{hint}")
        saved = Policy.parse(state["policy"])
        if strict and saved != self._policy:
            raise PolicyError(f'this checkpoint was written under policy "{saved}", this Precision runs '
                              f'"{self._policy}"; resume with Precision("{saved}"), or pass strict=False to '
                              "take only the parts both policies share")
        if self._scaler.enabled and saved.loss_scale.enabled:
            self._scaler.load_state_dict(state["loss_scale"])
        if self._policy.master_weights and "master_weights" in state:
            tensors = state["master_weights"]
            if len(tensors) != len(self._records):
                raise PolicyError(f"master weights for {len(tensors)} optimizer(s) in the checkpoint, "
                                  f"{len(self._records)} set up here; call setup(model, *optimizers) "
                                  "with the same optimizers before load_state_dict")
            for record, saved_tensors in zip(self._records.values(), tensors):
                record.masters.load_state_dict(saved_tensors)
        for r in self._records.values():
            r.stage, r.found_inf = "ready", {}
        self._pending = self._scaled_backward = False

    def load_grad_scaler_state(self, state: dict) -> None:
        """Take over a torch.amp.GradScaler's state (scale and growth tracker)."""
        if not self._scaler.enabled:
            raise PolicyError(f'"{self._policy}" has no loss scaling; a GradScaler state has nowhere to go')
        self._scaler.load_state_dict({"scale": state["scale"], "counter": state["_growth_tracker"]})

    def master_params(self, optimizer) -> list[torch.Tensor]:
        """The tensors ``optimizer`` updates (float32 copies under master=true): clip these."""
        self._record(optimizer)
        return [p for g in optimizer.param_groups for p in g["params"]]
