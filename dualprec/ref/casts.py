"""Cast rules of the spec: round-to-nearest-even casts, saturating FP8, NaN-aware equality."""

from __future__ import annotations

import numpy as np

from ..dtypes import ALL_DTYPES, numpy_dtype

# The spec's dtypes as NumPy/ml_dtypes dtypes, from the one table in dualprec.dtypes.
DTYPES = {name: numpy_dtype(name) for name in ALL_DTYPES}

# Largest finite value of each FP8 format; casts clip to it first (the spec is saturating).
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def dtype_of(name: str) -> np.dtype:
    """The numpy/ml_dtypes dtype for a spec dtype name; ValueError naming `dtype_name` otherwise."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype_name must be one of {sorted(DTYPES)}, got {name!r}") from None


def dtype_name(dtype) -> str:
    """The spec name of a numpy/ml_dtypes dtype (inverse of `dtype_of`)."""
    dt = np.dtype(dtype)
    for name, known in DTYPES.items():
        if dt == known:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dt}")


def cast(x, dtype_name: str) -> np.ndarray:
    """Cast `x` to `dtype_name` with one round-to-nearest-even step.

    FP8 casts saturate: values beyond the format's largest finite value, infinities
    included, become +-448 (e4m3fn) or +-57344 (e5m2), as torch's float8_e4m3fn cast
    and Transformer Engine's casts do; ml_dtypes alone gives NaN above 464 for e4m3fn and
    inf for e5m2. NaN stays NaN (its payload is not part of the spec: see `nan_equal`).
    """
    target = dtype_of(dtype_name)
    arr = np.asarray(x)
    if dtype_name in FP8_MAX:
        if arr.dtype.kind not in "fV" and arr.dtype not in DTYPES.values():
            arr = arr.astype(np.float32)
        limit = FP8_MAX[dtype_name]
        # Clip in float32 (exact for every source format but float64, which clips in float64),
        # so the only rounding is the final cast.
        work = np.float64 if arr.dtype == np.float64 else np.float32
        arr = np.clip(arr.astype(work), -limit, limit)
    with np.errstate(over="ignore"):  # overflow to inf is the defined result of a half cast
        return arr.astype(target)


def nan_equal(a, b) -> bool:
    """True when `a` and `b` have the same dtype, shape and bits, NaNs compared by mask.

    Frameworks write different NaN payloads, so NaN positions must agree and every other
    element must agree bit for bit (so +0.0 and -0.0 differ).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "b" or a.dtype.kind in "iu":
        return bool(np.array_equal(a, b))
    nan_a = np.isnan(a.astype(np.float64))
    nan_b = np.isnan(b.astype(np.float64))
    if not np.array_equal(nan_a, nan_b):
        return False
    uint = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(uint)[~nan_a], b.view(uint)[~nan_b]))
