"""FP8 recipes: Transformer Engine's delayed scaling (HYBRID or E4M3) and current scaling.

A scale multiplies before the cast (q = sat_cast(x * scale)) and its float32 reciprocal
multiplies after (x ~ q * (1/scale)), as in Transformer Engine.

Delayed scaling, per tensor role: step t quantizes with the scale held in the state (the
one computed after step t-1), then `fp8_delayed_update` records step t's amax and computes
the next scale. The history is rolled as Transformer Engine and Flax roll it: shift left by
one, then write the newest amax at index 0 (so "most_recent" reads index 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from .casts import FP8_MAX, cast

ROLES = ("input", "weight", "grad_output")
E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"


def role_format(role: str, recipe: Any) -> str:
    """FP8 dtype name for a role: HYBRID = E4M3 forward, E5M2 for grad_output."""
    fmt = getattr(recipe, "format", "hybrid")
    if fmt not in ("hybrid", "e4m3"):
        raise ValueError(f"recipe.format must be 'hybrid' or 'e4m3', got {fmt!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return E5M2 if (fmt == "hybrid" and role == "grad_output") else E4M3


@dataclasses.dataclass(frozen=True, eq=False)
class FP8Meta:
    """One tensor's delayed-scaling state: float32 scale and amax history (newest at 0)."""

    scale: np.float32
    amax_history: np.ndarray

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "amax_history": np.array(self.amax_history, np.float32)}

    @classmethod
    def from_dict(cls, d: dict) -> "FP8Meta":
        return cls(scale=np.float32(d["scale"]), amax_history=np.asarray(d["amax_history"], np.float32).copy())


@dataclasses.dataclass(frozen=True, eq=False)
class FP8State:
    """FP8Meta per role."""

    metas: dict

    def __getitem__(self, role: str) -> FP8Meta:
        return self.metas[role]

    def replace(self, role: str, meta: FP8Meta) -> "FP8State":
        return FP8State({**self.metas, role: meta})

    def to_dict(self) -> dict:
        return {role: meta.to_dict() for role, meta in self.metas.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FP8State":
        return cls({role: FP8Meta.from_dict(m) for role, m in d.items()})


def _check_recipe(recipe: Any) -> None:
    if recipe.scaling not in ("delayed", "current"):
        raise ValueError(f"recipe.scaling must be 'delayed' or 'current', got {recipe.scaling!r}")
    if recipe.amax_algo not in ("max", "most_recent"):
        raise ValueError(f"recipe.amax_algo must be 'max' or 'most_recent', got {recipe.amax_algo!r}")
    if int(recipe.history_len) < 1:
        raise ValueError(f"recipe.history_len must be >= 1, got {recipe.history_len!r}")


def fp8_delayed_init(recipe: Any, roles: Iterable[str] = ROLES) -> FP8State:
    """Scale 1.0 and an all-zero history of `recipe.history_len` for each role."""
    _check_recipe(recipe)
    metas = {}
    for role in roles:
        role_format(role, recipe)
        metas[role] = FP8Meta(np.float32(1.0), np.zeros(int(recipe.history_len), np.float32))
    return FP8State(metas)


def amax(x) -> np.float32:
    """max |x| in float32 (NaN if x holds one)."""
    return np.float32(np.max(np.abs(np.asarray(x).astype(np.float32))))


def _scale_from_amax(a: np.float32, previous: np.float32, fmt: str, margin: int) -> np.float32:
    # (fp8_max / amax) / 2**margin in float32; amax 0 or non-finite keeps the previous scale.
    if not (np.isfinite(a) and a > 0):
        return np.float32(previous)
    with np.errstate(over="ignore"):
        s = np.float32(FP8_MAX[fmt]) / a
        return np.float32(s / np.float32(2.0**margin))


def fp8_delayed_update(state: FP8State, role: str, amax_value, recipe: Any) -> FP8State:
    """Record `amax_value` (this step's amax of `role`) and compute the next step's scale."""
    _check_recipe(recipe)
    meta = state[role]
    history = np.roll(meta.amax_history, -1)
    history[0] = np.float32(amax_value)
    reduced = history.max() if recipe.amax_algo == "max" else history[0]
    fmt = role_format(role, recipe)
    scale = _scale_from_amax(np.float32(reduced), meta.scale, fmt, int(recipe.margin))
    return state.replace(role, FP8Meta(scale, history))


def fp8_current_scale(x, fmt: str) -> np.float32:
    """Current scaling: fp8_max / amax(x) in float32; amax 0 or non-finite gives 1.0."""
    if fmt not in FP8_MAX:
        raise ValueError(f"fmt must be one of {sorted(FP8_MAX)}, got {fmt!r}")
    return _scale_from_amax(amax(x), np.float32(1.0), fmt, 0)


def quantize_fp8(x, scale, fmt: str) -> np.ndarray:
    """Saturating cast of float32(x * scale) to `fmt`."""
    if fmt not in FP8_MAX:
        raise ValueError(f"fmt must be one of {sorted(FP8_MAX)}, got {fmt!r}")
    return cast(np.asarray(x).astype(np.float32) * np.float32(scale), fmt)


def dequantize_fp8(q, scale, dtype: str = "float32") -> np.ndarray:
    """float32(q) * float32(1/scale), cast to `dtype`."""
    inv = np.float32(np.float32(1.0) / np.float32(scale))
    return cast(np.asarray(q).astype(np.float32) * inv, dtype)


def _qdq(x, scale, fmt):
    return dequantize_fp8(quantize_fp8(x, scale, fmt), scale)


def fp8_gemm_qdq(x, w, state: FP8State, recipe: Any, grad_output=None):
    """Quantize-dequantize a GEMM's operands (and its output gradient, if given).

    Returns `(x_qdq, w_qdq, g_qdq_or_None, new_state)`, all float32. Delayed scaling
    uses the scales in `state` and returns the state updated with this step's amaxes;
    current scaling derives each scale from the tensor itself and returns `state` as is.
    """
    _check_recipe(recipe)
    tensors = {"input": x, "weight": w, "grad_output": grad_output}
    out: dict[str, np.ndarray | None] = {}
    for role, t in tensors.items():
        if t is None:
            out[role] = None
            continue
        fmt = role_format(role, recipe)
        if recipe.scaling == "current":
            out[role] = _qdq(t, fp8_current_scale(t, fmt), fmt)
        else:
            out[role] = _qdq(t, state[role].scale, fmt)
            state = fp8_delayed_update(state, role, amax(t), recipe)
    return out["input"], out["weight"], out["grad_output"], state
