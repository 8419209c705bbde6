"""Loss scaling in torch: the one rule of docs/contract.md, bit for bit torch.amp.GradScaler's.

The vocabulary is the same in every package (docs/architecture.md): the configuration is the
Policy's `dualprec.LossScaleConfig`; the state is a `LossScaleState` (``scale``, ``counter``;
here a float32 and an int32 0-dim tensor on the loss's device, so nothing syncs until a step
is decided); `LossScaler` is the one stateful helper that holds a state and runs the same
kernels GradScaler runs (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`),
then applies the optional min/max clamps GradScaler lacks.  It knows nothing of optimizers:
`Precision` decides which gradients to unscale and when to update, the way GradScaler's
step/update do.

Kinds: ``dynamic`` follows the rule; ``static`` keeps its scale but still finds non-finite
gradients (the step is skipped, never applied with NaNs); ``none`` scales by 1 and checks
nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from dualprec.ref.loss_scale import scale_bounds

__all__ = ["LossScaleState", "LossScaler"]


class LossScaleState(NamedTuple):
    """The loss-scale state: ``scale`` (float32 0-dim tensor) and ``counter`` (int32 0-dim
    tensor, finite steps since the scale last changed); `dualprec_jax.LossScaleState` and
    `dualprec.ref.loss_scale.LossScaleState` have the same fields and meaning."""

    scale: torch.Tensor
    counter: torch.Tensor


class LossScaler:
    """The stateful loss-scale helper of the torch backend (what GradScaler is to torch).

    Args:
        config: The policy's `dualprec.LossScaleConfig` (``policy.loss_scale``).
    """

    def __init__(self, config):
        self.config = config
        init = config.init_scale if config.enabled else 1.0
        self._scale = torch.full((), init, dtype=torch.float32)
        self._counter = torch.full((), 0, dtype=torch.int32)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def _to(self, device: torch.device) -> None:
        if self._scale.device != device:
            self._scale = self._scale.to(device)
            self._counter = self._counter.to(device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` exactly as GradScaler.scale forms it (a 0-dim float32 factor)."""
        self._to(loss.device)
        return loss * self._scale

    def unscale_(self, grads: list[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
        """Multiply ``grads`` in place by fp32(1/scale); per device, a float32 flag > 0 when
        some gradient was not finite (GradScaler's ``found_inf_per_device``)."""
        # the reciprocal is formed in float64 and rounded once, as GradScaler does
        inv_scale = self._scale.double().reciprocal().float()
        groups: dict[torch.device, dict[torch.dtype, list]] = defaultdict(lambda: defaultdict(list))
        for g in grads:
            groups[g.device][g.dtype].append(g)
        found: dict[torch.device, torch.Tensor] = {}
        with torch.no_grad():
            for device, by_dtype in groups.items():
                found[device] = torch.zeros((), dtype=torch.float32, device=device)
                inv = inv_scale.to(device)
                for same_dtype in by_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found[device], inv)
        return found

    def _updated(self, found_infs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (scale, counter) tensors after an update from ``found_infs``, computed on copies;
        None when the update changes nothing (static or none, or nothing stepped)."""
        if self.config.kind != "dynamic" or not found_infs:
            return None
        combined = found_infs[0].to(self._scale.device)
        for f in found_infs[1:]:
            combined = combined + f.to(self._scale.device)
        c = self.config
        scale, counter = self._scale.clone(), self._counter.clone()
        torch._amp_update_scale_(scale, counter, combined, c.growth_factor, c.backoff_factor, c.growth_interval)
        lo, hi = scale_bounds(c)  # min/max, inside [2**-126, 2**126] (the range shared with JAX)
        scale.clamp_(min=lo, max=hi)
        return scale, counter

    def update(self, found_infs: list[torch.Tensor]) -> None:
        """Advance the state after a step; ``found_infs`` are the flags of every optimizer
        unscaled since the last update (any > 0 means the step was skipped)."""
        new = self._updated(found_infs)
        if new is not None:
            self._scale.copy_(new[0])
            self._counter.copy_(new[1])

    def peek(self, found_infs: list[torch.Tensor] | None = None) -> LossScaleState:
        """The state, as a copy, after an update from ``found_infs`` (None: the state now);
        the scaler itself is left as it is."""
        new = self._updated(found_infs) if found_infs is not None else None
        scale, counter = new if new is not None else (self._scale.clone(), self._counter.clone())
        return LossScaleState(scale, counter)

    # ----- state ----------------------------------------------------------------------
    @property
    def state(self) -> LossScaleState:
        """A copy of the current `LossScaleState`."""
        return self.peek()

    @property
    def scale(self) -> float:
        return float(self._scale.item())

    @property
    def counter(self) -> int:
        return int(self._counter.item())

    def state_dict(self) -> dict:
        return {"scale": self.scale, "counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        try:
            scale, counter = state["scale"], state["counter"]
        except (KeyError, TypeError):
            raise ValueError(f"a loss-scale state needs 'scale' and 'counter', got {state!r}") from None
        self._scale.fill_(float(scale))
        self._counter.fill_(int(counter))
