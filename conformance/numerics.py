"""Measuring how far two arrays are apart: absolute, relative and ULP errors, and bit equality.

The unit of disagreement is the ULP of the *compute* dtype at the reference value's
magnitude: one ULP is exactly what a single differently-rounded op can cost, so "3 ULPs of
bfloat16" reads as "three roundings disagree" whatever the tensor's own dtype.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from dualprec.ref.casts import nan_equal

#: Explicit mantissa bits and smallest normal exponent of each float dtype.
_MANT = {"float64": 52, "float32": 23, "bfloat16": 7, "float16": 10}
_MIN_EXP = {"float64": -1022, "float32": -126, "bfloat16": -126, "float16": -14}


def eps(dtype: str) -> float:
    """Machine epsilon (distance from 1.0 to the next float) of a spec dtype."""
    return 2.0 ** -_MANT[dtype]


def ulp(x, dtype: str) -> np.ndarray:
    """The ULP of ``dtype`` at each |x| (subnormal range: the smallest normal's ULP)."""
    mag = np.maximum(np.abs(np.asarray(x, np.float64)), 2.0 ** _MIN_EXP[dtype])
    return 2.0 ** (np.floor(np.log2(mag)) - _MANT[dtype])


def dtype_name(arr) -> str:
    dt = np.asarray(arr).dtype
    if dt == ml_dtypes.bfloat16:
        return "bfloat16"
    return dt.name


@dataclasses.dataclass
class Diff:
    """How ``got`` differs from ``ref``.

    ``rel`` is |got - ref| / (|ref| + scale) where ``scale`` is the mean |ref| of the tensor:
    elementwise relative error that does not explode where a value happens to cancel to ~0.
    ``ok`` compares that against ``tol`` (set by :func:`diff`).
    """

    max_abs: float
    max_rel: float
    max_ulp: float
    argmax: tuple
    nan_mismatch: int
    shape_ok: bool
    tol: float | None = None

    @property
    def ok(self) -> bool:
        if not self.shape_ok or self.nan_mismatch:
            return False
        return self.tol is None or self.max_rel <= self.tol


def diff(got, ref, ulp_dtype: str = "float32", tol: float | None = None) -> Diff:
    """Errors of ``got`` against ``ref`` (any float dtypes; compared in float64)."""
    g = np.asarray(got).astype(np.float64)
    r = np.asarray(ref).astype(np.float64)
    if g.shape != r.shape:
        return Diff(np.inf, np.inf, np.inf, (), 0, False, tol)
    if g.size == 0:
        return Diff(0.0, 0.0, 0.0, (), 0, True, tol)
    nan_g, nan_r = ~np.isfinite(g), ~np.isfinite(r)
    mismatch = int(np.sum(nan_g != nan_r))
    both = nan_g & nan_r
    same_special = both & ((g == r) | (np.isnan(g) & np.isnan(r)))
    mismatch += int(np.sum(both & ~same_special))
    fin = ~(nan_g | nan_r)
    if not fin.any():
        return Diff(0.0, 0.0, 0.0, (), mismatch, True, tol)
    err = np.abs(np.where(fin, g, 0.0) - np.where(fin, r, 0.0))
    scale = float(np.mean(np.abs(r[fin]))) or 2.0 ** _MIN_EXP.get(ulp_dtype, -126)
    rel = err / (np.abs(np.where(fin, r, 0.0)) + scale)
    ulps = err / ulp(np.maximum(np.abs(np.where(fin, r, 0.0)), scale), ulp_dtype)
    idx = np.unravel_index(int(np.argmax(rel)), rel.shape)
    return Diff(float(err.max()), float(rel.max()), float(ulps.max()),
                tuple(int(i) for i in idx), mismatch, True, tol)


def bit_equal(a, b) -> bool:
    """Same dtype, shape and bits (NaNs by mask): the bit-exact tier's equality."""
    return nan_equal(a, b)


def first_bit_difference(a, b) -> str:
    """A short description of where two arrays first differ bitwise, for failure messages."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        return f"dtype {dtype_name(a)} vs {dtype_name(b)}"
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    af, bf = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    differs = ~((af == bf) & (np.signbit(af) == np.signbit(bf))) & ~(np.isnan(af) & np.isnan(bf))
    n = int(differs.sum())
    if not n:
        return "equal"
    i = int(np.argmax(differs))
    return f"{n}/{af.size} elements differ; first at flat index {i}: {af[i]!r} vs {bf[i]!r}"


@dataclasses.dataclass
class Stats:
    """Agreement of two arrays in units of the ULP of their (narrower) dtype.

    ``max_ulp``, ``p999_ulp`` and ``p50_ulp`` measure |got - ref| against the ULP at max(|ref|, mean|ref|)
    (so a value that cancels to ~0 is judged at the tensor's scale); ``neq_frac`` is the
    fraction of elements that are not bitwise equal; ``size`` the element count."""

    max_ulp: float
    p999_ulp: float
    neq_frac: float
    max_rel: float
    size: int
    dtype: str
    ok_shape: bool = True
    nan_mismatch: int = 0
    p50_ulp: float = 0.0  # the median element's error, same unit

    def to_dict(self) -> dict:
        return {"max_ulp": self.max_ulp, "p999_ulp": self.p999_ulp, "p50_ulp": self.p50_ulp,
                "neq_frac": self.neq_frac, "max_rel": self.max_rel, "size": self.size, "dtype": self.dtype}


def narrower(a, b) -> str:
    names = [dtype_name(a), dtype_name(b)]
    floats = [n for n in names if n in _MANT]
    return max(floats, key=lambda n: -_MANT[n]) if floats else "float32"


def measure(got, ref) -> Stats:
    """:class:`Stats` of ``got`` against ``ref`` in ULP of the narrower of their dtypes."""
    dt = narrower(got, ref)
    d = diff(got, ref, dt)
    g = np.asarray(got).astype(np.float64)
    r = np.asarray(ref).astype(np.float64)
    if not d.shape_ok:
        return Stats(np.inf, np.inf, 1.0, np.inf, int(r.size), dt, ok_shape=False)
    if r.size == 0:
        return Stats(0.0, 0.0, 0.0, 0.0, 0, dt)
    fin = np.isfinite(g) & np.isfinite(r)
    scale = float(np.mean(np.abs(r[fin]))) if fin.any() else 1.0
    err = np.abs(np.where(fin, g - r, 0.0))
    u = err / ulp(np.maximum(np.abs(np.where(fin, r, 0.0)), scale or 2.0 ** _MIN_EXP[dt]), dt)
    same = (g == r) | (np.isnan(g) & np.isnan(r))
    p50, p999 = np.quantile(u, (0.5, 0.999))
    return Stats(float(u.max()), float(p999), float(1.0 - same.mean()), d.max_rel,
                 int(r.size), dt, True, d.nan_mismatch, float(p50))
