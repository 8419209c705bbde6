"""The documented exceptions to bit-exactness: the one place the checks read them from.

The spec's cast rule is round-to-nearest-even with subnormals kept (what NumPy, ml_dtypes
and torch do).  XLA's CPU runtime runs its kernels with the x86 denormals-are-zero /
flush-to-zero modes on, and the ``cvtss2sd`` instruction behind a float32 -> float64
convert honours DAZ: a float32 *subnormal input* comes out as a zero of the same sign.
Converts to bfloat16 and float16 are done with integer bit arithmetic and keep subnormals,
so only widening converts of float32 subnormals are affected.  A user cannot switch the
flush off from Python, and the values involved (|x| < 1.2e-38) are below anything a model
computes with, so the spec declares them implementation-defined: such an element may be the
exact value or a signed zero, every other element must still be bit-exact.

An :class:`Exemption` says which backend, which conversion and which elements; checks call
:func:`apply` and report every element an exemption absorbed in the record's detail, so
the exception is visible rather than silent.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Exemption:
    id: str
    backend: str        # Backend.name it applies to
    source: str         # dtype of the input
    target: str         # dtype of the result
    why: str

    def applies(self, backend: str, source: str, target: str) -> bool:
        return (backend, source, target) == (self.backend, self.source, self.target)

    def allowed(self, x: np.ndarray, got: np.ndarray, expect: np.ndarray) -> np.ndarray:
        """Elements where ``got`` may differ from ``expect``: a float32 subnormal input,
        and ``got`` is a zero of the input's sign."""
        x32 = np.asarray(x, np.float32)
        sub = (x32 != 0) & (np.abs(x32) < np.finfo(np.float32).tiny)
        g = np.asarray(got).astype(np.float64)
        return sub & (g == 0) & (np.signbit(g) == np.signbit(x32))


EXEMPTIONS: tuple[Exemption, ...] = (
    Exemption("xla-cpu-subnormal-flush", "jax", "float32", "float64",
              "XLA:CPU converts float32 -> float64 with denormals-are-zero on: a float32 "
              "subnormal input becomes a signed zero"),
)


def apply(backend: str, x: np.ndarray, got: np.ndarray, expect: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """``got`` with every exempted element replaced by ``expect``'s, and a note per exemption
    that absorbed elements (empty when none did)."""
    from .numerics import dtype_name

    src, dst = dtype_name(x), dtype_name(got)
    notes = []
    if np.shape(got) != np.shape(expect):
        return got, notes
    for ex in EXEMPTIONS:
        if ex.applies(backend, src, dst):
            mask = ex.allowed(x, got, expect)
            if mask.any():
                got = np.where(mask, expect, got).astype(np.asarray(got).dtype)
                notes.append(f"{backend}: {int(mask.sum())} element(s) under exemption {ex.id} ({ex.why})")
    return got, notes
