"""Dtype names of the spec: plain strings both backends map to their own dtype objects.

A Policy stores dtypes as canonical NumPy names ("float32", "bfloat16", "float16",
"float64"): comparable, hashable, serialisable, and `numpy.dtype(name)` works for all of
them once ml_dtypes is imported.  Users may pass aliases (jmp's "f32"/"full"/"half",
"fp16", ...) or dtype objects of NumPy, ml_dtypes, torch or JAX; `canonical_dtype` maps them.
"""

from __future__ import annotations

from typing import Any

from .errors import PolicyError, did_you_mean

__all__ = ["FLOAT_DTYPES", "HALF_DTYPES", "canonical_dtype", "short_dtype"]

#: Canonical floating dtype names a policy may use, widest first.
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")

# "half" follows jmp on CPU and GPU (float16); jmp picks bfloat16 on TPU, the spec does not
# depend on the device, so it is always float16 here.
_ALIASES = {
    "float64": "float64", "f64": "float64", "fp64": "float64", "double": "float64",
    "float32": "float32", "f32": "float32", "fp32": "float32", "full": "float32",
    "float": "float32", "single": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
}

_SHORT = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def canonical_dtype(value: Any, *, what: str = "dtype") -> str:
    """Map a dtype name, alias or dtype object to its canonical name, or raise PolicyError."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name.startswith(("torch.", "jnp.", "np.", "numpy.")):
            name = name.split(".", 1)[1]
    else:
        name = _object_dtype_name(value)
        if name is None:
            raise PolicyError(f"{what}: {value!r} is not a dtype; use one of {', '.join(FLOAT_DTYPES)}")
    if name in _ALIASES:
        return _ALIASES[name]
    raise PolicyError(
        f'{what}: unknown dtype "{value}"{did_you_mean(str(name), _ALIASES)}; '
        f"a policy uses floating dtypes only: {', '.join(FLOAT_DTYPES)} (or f64, f32, bf16, f16)"
    )


def _object_dtype_name(value: Any) -> str | None:
    text = str(value)
    if text.startswith("torch."):  # torch.dtype prints as "torch.bfloat16"
        return text[len("torch."):]
    try:
        import numpy as np
        import ml_dtypes  # noqa: F401  registers bfloat16 with numpy

        return np.dtype(value).name
    except TypeError:
        return None


def short_dtype(name: str) -> str:
    """jmp's short spelling of a canonical dtype name ("bfloat16" -> "bf16")."""
    return _SHORT[name]

