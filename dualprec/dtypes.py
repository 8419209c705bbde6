"""The one dtype table of dualprec: canonical names, their NumPy/ml_dtypes dtypes, widths.

A Policy stores dtypes as canonical NumPy names ("float32", "bfloat16", "float16",
"float64"): comparable, hashable, serialisable, and `numpy.dtype(name)` works for all of
them once ml_dtypes is imported.  Users may pass aliases (jmp's "f32"/"full"/"half",
"fp16", ...) or dtype objects of NumPy, ml_dtypes, torch or JAX; `canonical_dtype` maps them.

`TABLE` lists every floating dtype the library names (the policy dtypes and the two FP8
formats the FP8 recipes store); everything else is derived from it here or in the
backends (`dualprec_torch.casts.torch_dtype`, `dualprec_jax.casts.jax_dtype`, the reference
codecs' `dualprec.ref.casts.dtype_of`), which map the canonical name onto their own dtype
object rather than keep a second list.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from .errors import PolicyError, did_you_mean

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DtypeInfo", "TABLE", "ALL_DTYPES", "FLOAT_DTYPES", "HALF_DTYPES", "dtype_info",
           "numpy_dtype", "dtype_bits", "canonical_dtype", "short_dtype"]


@dataclasses.dataclass(frozen=True)
class DtypeInfo:
    """One row of the dtype table."""

    name: str       #: canonical name, also the attribute name in numpy/ml_dtypes, torch and jax.numpy
    short: str      #: short spelling (jmp's for the policy dtypes)
    bits: int       #: storage width
    is_half: bool   #: a 16-bit floating format (what mixed policies compute in)
    in_policy: bool  #: a policy may use it as param/compute/output/reduce dtype


#: Every floating dtype the library names, widest first.
TABLE = (
    DtypeInfo("float64", "f64", 64, is_half=False, in_policy=True),
    DtypeInfo("float32", "f32", 32, is_half=False, in_policy=True),
    DtypeInfo("bfloat16", "bf16", 16, is_half=True, in_policy=True),
    DtypeInfo("float16", "f16", 16, is_half=True, in_policy=True),
    DtypeInfo("float8_e4m3fn", "e4m3", 8, is_half=False, in_policy=False),
    DtypeInfo("float8_e5m2", "e5m2", 8, is_half=False, in_policy=False),
)
_BY_NAME = {d.name: d for d in TABLE}

#: All canonical names of the table (FP8 included), widest first.
ALL_DTYPES = tuple(_BY_NAME)
#: Canonical floating dtype names a policy may use, widest first.
FLOAT_DTYPES = tuple(d.name for d in TABLE if d.in_policy)
HALF_DTYPES = tuple(d.name for d in TABLE if d.is_half)


def dtype_info(name: str) -> DtypeInfo:
    """The table row of a canonical dtype name; KeyError for a name the table lacks."""
    return _BY_NAME[name]


@functools.cache
def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype (ml_dtypes for bfloat16 and FP8) of a canonical dtype name."""
    import ml_dtypes
    import numpy as np

    info = _BY_NAME[name]
    return np.dtype(getattr(np, info.name, None) or getattr(ml_dtypes, info.name))


def dtype_bits(name: str) -> int:
    """Storage width in bits of a canonical dtype name ("bfloat16" -> 16)."""
    return _BY_NAME[name].bits

# "half" follows jmp on CPU and GPU (float16); jmp picks bfloat16 on TPU, the spec does not
# depend on the device, so it is always float16 here.
_ALIASES = {
    "float64": "float64", "f64": "float64", "fp64": "float64", "double": "float64",
    "float32": "float32", "f32": "float32", "fp32": "float32", "full": "float32",
    "float": "float32", "single": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
}


def canonical_dtype(value: Any, *, what: str = "dtype") -> str:
    """Map a dtype name, alias or dtype object to its canonical name, or raise PolicyError."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name.startswith(("torch.", "jnp.", "np.", "numpy.")):
            name = name.split(".", 1)[1]
    else:
        object_name = _object_dtype_name(value)
        if object_name is None:
            raise PolicyError(f"{what}: {value!r} is not a dtype; use one of {', '.join(FLOAT_DTYPES)}")
        name = object_name
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
        import ml_dtypes  # noqa: F401  registers bfloat16 with numpy
        import numpy as np

        return np.dtype(value).name
    except TypeError:
        return None


def short_dtype(name: str) -> str:
    """jmp's short spelling of a canonical dtype name ("bfloat16" -> "bf16")."""
    return _BY_NAME[name].short

