"""The one loss-scaling rule (none, static, dynamic) as a pure state machine.

Example, with `dualprec.LossScaleConfig` or any object carrying the same attributes::

    state = loss_scale_init(config)            # scale 2**16, counter 0
    for grads in scaled_grad_stream:
        finite = all_finite(grads)
        if finite:
            apply(unscale(grads, state))       # otherwise skip the optimizer step
        state = loss_scale_update(state, finite, config)

Arithmetic follows torch.amp.GradScaler's CPU kernel exactly: the product of the float32
scale and the (Python float) factor is formed in float64 and rounded once to float32.
For factors exact in float32 (2.0, 0.5) this equals jmp's float32 product; for others
(1.1, say) jmp's float32 product can differ in the last bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

KINDS = ("none", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class LossScaleState:
    """Current scale (float32) and the count of finite steps since the last change."""

    scale: np.float32
    counter: int

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "counter": int(self.counter)}

    @classmethod
    def from_dict(cls, d: dict) -> "LossScaleState":
        try:
            return cls(scale=np.float32(d["scale"]), counter=int(d["counter"]))
        except KeyError as e:
            raise ValueError(f"loss-scale state dict is missing {e.args[0]!r}") from None


#: The range every dynamic scale stays in, in all three implementations: normal float32
#: numbers whose reciprocal is normal too.  XLA flushes float32 subnormals to zero, so below
#: 2**-126 a JAX scale would become 0, and from 2**126 up 1/scale would (zeroing every unscaled
#: gradient); GradScaler itself continues to 2**127 and into the subnormals.
SCALE_MIN, SCALE_MAX = 2.0**-126, 2.0**126


def scale_bounds(config: Any) -> tuple[float, float]:
    """(floor, cap) of a dynamic scale: ``min_scale``/``max_scale`` where set, inside
    [SCALE_MIN, SCALE_MAX]."""
    lo = SCALE_MIN if getattr(config, "min_scale", None) is None else max(float(config.min_scale), SCALE_MIN)
    hi = SCALE_MAX if getattr(config, "max_scale", None) is None else min(float(config.max_scale), SCALE_MAX)
    return lo, hi


def _kind(config: Any) -> str:
    kind = getattr(config, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"config.kind must be one of {KINDS}, got {kind!r}")
    return kind


def _times(scale: np.float32, factor: float) -> np.float32:
    with np.errstate(over="ignore"):  # an inf product is detected by the caller
        return np.float32(np.float64(scale) * np.float64(factor))


def loss_scale_init(config: Any) -> LossScaleState:
    """Initial state: `init_scale` for static and dynamic, 1.0 for none."""
    kind = _kind(config)
    scale = 1.0 if kind == "none" else config.init_scale
    return LossScaleState(scale=np.float32(scale), counter=0)


def loss_scale_update(state: LossScaleState, finite: bool, config: Any) -> LossScaleState:
    """The state after a step whose scaled gradients were `finite` (or not).

    Dynamic: non-finite -> scale * backoff (floored at `min_scale` if set, and always at
    2**-126), counter 0; finite -> counter + 1, and at `growth_interval` scale * growth if
    that is finite (capped at `max_scale` if set, and always at 2**126), counter 0. Static
    and none never change.
    """
    if _kind(config) != "dynamic":
        return state
    lo, hi = scale_bounds(config)
    if not finite:
        scale = max(_times(state.scale, config.backoff_factor), np.float32(lo))
        return LossScaleState(scale=np.float32(scale), counter=0)
    counter = state.counter + 1
    if counter < config.growth_interval:
        return LossScaleState(scale=state.scale, counter=counter)
    grown = _times(state.scale, config.growth_factor)
    scale = grown if np.isfinite(grown) else state.scale
    scale = min(scale, np.float32(hi))
    return LossScaleState(scale=np.float32(scale), counter=0)


def _leaves(grads) -> Iterable[np.ndarray]:
    if isinstance(grads, dict):
        for v in grads.values():
            yield from _leaves(v)
    elif isinstance(grads, (list, tuple)):
        for v in grads:
            yield from _leaves(v)
    elif grads is not None:
        yield np.asarray(grads)


def all_finite(grads) -> bool:
    """True when every scaled gradient (nested dict/list/tuple of arrays) is finite: half
    precision upcast to float32, float64 checked in float64 (torch.amp.GradScaler's rule)."""
    return all(bool(np.isfinite(g.astype(np.promote_types(g.dtype, np.float32))).all()) for g in _leaves(grads))


def unscale(grads, state: LossScaleState):
    """Gradients times float32(1/scale), in float32 (float64 gradients stay float64, as
    GradScaler unscales them), with the same nesting as `grads`."""
    inv = np.float32(np.float32(1.0) / state.scale)

    def go(g):
        if isinstance(g, dict):
            return {k: go(v) for k, v in g.items()}
        if isinstance(g, (list, tuple)):
            return type(g)(go(v) for v in g)
        g = np.asarray(g)
        wide = np.promote_types(g.dtype, np.float32)
        return g.astype(wide) * inv.astype(wide)

    return go(grads)
