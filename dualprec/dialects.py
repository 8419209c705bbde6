"""Exports of a Policy to the spellings of jmp, Keras and Lightning Fabric.

Each export refuses, with a PolicyError naming the field, to drop anything the target
cannot express; ``ignore=("loss_scale", ...)`` drops the named fields knowingly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from .dtypes import short_dtype
from .errors import PolicyError
from .policy import FP8Recipe, LossScaleConfig, Policy

__all__ = ["to_jmp_string", "to_keras_name", "to_fabric_precision"]

_FIELDS = ("output_dtype", "reduce_dtype", "loss_scale", "quantization", "fp8", "master_weights", "overrides")


def _without(p: Policy, ignore: Iterable[str]) -> Policy:
    unknown = set(ignore) - set(_FIELDS)
    if unknown:
        raise PolicyError(f"ignore: unknown field(s) {sorted(unknown)}; choose from {', '.join(_FIELDS)}")
    changes: dict[str, Any] = {}
    for name in ignore:
        if name == "reduce_dtype":
            changes[name] = p.param_dtype
        elif name == "output_dtype":
            changes[name] = p.compute_dtype
        else:
            changes[name] = getattr(Policy(), name)
    return dataclasses.replace(p, **changes) if changes else p


def _refuse(p: Policy, target: str, lost: list[str]) -> None:
    if not lost:
        return
    fields = [f for f in dict.fromkeys(re.split(r"[ =(]", x, maxsplit=1)[0] for x in lost) if f in _FIELDS]
    fixed = [x for x in lost if re.split(r"[ =(]", x, maxsplit=1)[0] not in _FIELDS]
    if fixed:  # params/compute combinations: nothing to drop, the target has no such policy
        hint = f"no ignore= helps with {', '.join(fixed)}"
    else:
        hint = (f"pass ignore=({', '.join(repr(f) for f in fields)},) to drop "
                f"{'it' if len(fields) == 1 else 'them'} knowingly")
    raise PolicyError(f"{p} has no {target} equivalent: {target} cannot express {', '.join(lost)}; {hint}")


def to_jmp_string(p: Policy, *, ignore: Iterable[str] = ()) -> str:
    """jmp.get_policy() string, e.g. "p=f32,c=bf16,o=f32".  jmp keeps loss scaling in a
    separate object (see dualprec_jax), so a policy with loss scaling needs
    ignore=("loss_scale",)."""
    q = _without(p, ignore)
    lost = []
    if q.reduce_dtype != q.param_dtype:
        lost.append("reduce_dtype")
    if q.loss_scale.enabled:
        lost.append("loss_scale")
    for name in ("quantization", "fp8", "overrides"):
        if getattr(q, name):
            lost.append(name)
    if q.master_weights:
        lost.append("master_weights")
    _refuse(p, "jmp", lost)
    param, compute, output, _ = q._dtype_names()
    return f"p={short_dtype(param)},c={short_dtype(compute)},o={short_dtype(output)}"


_KERAS_MIXED = {("float32", "bfloat16"): "mixed_bfloat16", ("float32", "float16"): "mixed_float16"}


def to_keras_name(p: Policy, *, ignore: Iterable[str] = ()) -> str:
    """Keras 3 dtype policy name ("mixed_bfloat16", "int8_from_float32", ...)."""
    from .presets import presets

    q = _without(p, ignore)
    lost = []
    if q.output_dtype != q.compute_dtype:
        lost.append("output_dtype (Keras layers output their compute dtype)")
    if q.reduce_dtype != q.param_dtype:
        lost.append("reduce_dtype")
    if q.master_weights:
        lost.append("master_weights")
    if q.overrides:
        lost.append("overrides")
    prefix = ""
    if q.quantization is not None:
        if q.quantization.mode == "int8" and q.quantization.threshold == 0.0 and not q.quantization.skip:
            prefix = "int8_from_"
        else:
            lost.append(f"quantization ({q.quantization.mode}; Keras has only per-channel int8)")
    if q.fp8 is not None:
        if q.fp8 == FP8Recipe("delayed"):
            prefix = "float8_from_" if not prefix else prefix
            if q.quantization is not None:
                lost.append("fp8 together with quantization")
        else:
            lost.append("fp8 (Keras float8 is delayed scaling with default settings)")
    if q.param_dtype == q.compute_dtype:
        base = q.param_dtype
        if q.loss_scale.enabled:
            lost.append("loss_scale (Keras scales the loss only for mixed_float16)")
    elif (mixed := _KERAS_MIXED.get((q.param_dtype, q._dtype_names()[1]))) is not None:
        base = mixed
        expected = presets()["mixed_float16"].loss_scale if base == "mixed_float16" else LossScaleConfig()
        if q.loss_scale != expected:
            lost.append(f"loss_scale (Keras {base} implies {str(expected.kind)}"
                        + (" scaling from 2**15, growing every 1000 steps)" if expected.enabled else ")"))
    else:
        base = ""  # not returned: lost is not empty, so _refuse raises
        lost.append(f"params={q.param_dtype} with compute={q.compute_dtype}")
    _refuse(p, "Keras", lost)
    return prefix + base


def to_fabric_precision(p: Policy, *, ignore: Iterable[str] = ()) -> str:
    """Lightning Fabric's ``precision=`` string.  bitsandbytes modes come back as the mode
    name, which Fabric takes as ``BitsandbytesPrecision(mode=..., dtype=...)``."""
    from .presets import PRESET_TABLE

    q = _without(p, ignore)
    for row in PRESET_TABLE:
        if row.source in ("Lightning Fabric", "bitsandbytes") and row.policy == q:
            return row.name
    raise PolicyError(f"{p} has no Lightning Fabric precision string; Fabric offers "
                      + ", ".join(r.name for r in PRESET_TABLE if r.source == "Lightning Fabric")
                      + " (and the bitsandbytes modes via BitsandbytesPrecision)")
