"""Tolerances of the tolerance tier, derived from the policy's compute dtype.

Both backends accumulate matmul-like ops in float32 (float64 for float64 policies) and round
once to the compute dtype, so they can disagree in two ways only:

* a rounding to the compute dtype that lands on different sides of a rounding boundary
  because the float32 sums were formed in a different order: 1 ULP (eps_c relative, 2 ULP
  counted against the smaller neighbour) at a stage, on rare elements, independently per
  stage, so sqrt(n_round) of them along the ``n_round`` stages of the longest path;
* the float32 accumulation order itself: about sqrt(n) * eps_acc for a reduction of length n
  (the statistical bound for round-to-nearest), per layer, times SAFETY for libm differences.

So a forward output may differ, elementwise and relative to its magnitude, by

    tol_forward = 2 * eps_c * sqrt(n_round) + SAFETY * eps_acc * sqrt(n_reduce) * n_layers

Gradients run the chain twice (forward and backward), ``tol_grad = 2 * tol_forward``.  A
training trajectory adds one forward's worth of error per step through the parameters:
the loss at step t is checked against ``tol_forward * (1 + t)`` and the parameters after N
steps against ``tol_grad * (1 + N)`` (SGD moves them by lr * grad, so this is loose for
small lr and tight enough to catch a wrong cast).  ``SAFETY`` is 4: transcendental functions
(erf, exp, rsqrt) have float32 implementations that differ by up to ~1-2 ULP between the
frameworks.  The compute-dtype term stays below the error of a wrong compute dtype (float16
instead of bfloat16 differs by ~eps_bf16 on most elements, not on a few).

The relative error is measured as |a - b| / (|b| + mean|b|) (see numerics.diff), so values
that cancel to ~0 are judged against the tensor's scale.
"""

from __future__ import annotations

import dataclasses
import math

from dualprec import Policy

from .numerics import eps

SAFETY = 4.0


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the tolerance formula needs to know about a model."""

    n_round: int     # rounding stages on the longest forward path (matmuls, activations, norms)
    n_reduce: int    # longest reduction (dot-product length, norm width, pooled count)
    n_layers: int    # matmul-like layers on the longest path


@dataclasses.dataclass(frozen=True)
class Tolerance:
    compute_dtype: str
    accumulate_dtype: str
    forward: float
    grad: float

    def loss_at(self, step: int) -> float:
        return self.forward * (1 + step)

    def params_after(self, steps: int) -> float:
        return self.grad * (1 + steps)


def narrowest_compute(policy: Policy) -> str:
    """The compute or output dtype with the fewest mantissa bits among the policy and its
    overrides: 64-true computes in float64 but rounds its outputs (and so the loss and every
    gradient) to float32, so float32 bounds what the two sides can agree on."""
    dts = [d for p in (policy, *(sub for _, sub in policy.overrides)) for d in (p.compute_dtype, p.output_dtype)]
    return max(dts, key=eps)


def tolerance(policy: Policy, shape: ModelShape) -> Tolerance:
    c = narrowest_compute(policy)
    acc = "float64" if c == "float64" else "float32"
    fwd = 2 * eps(c) * math.sqrt(shape.n_round) + SAFETY * eps(acc) * math.sqrt(shape.n_reduce) * shape.n_layers
    return Tolerance(c, acc, fwd, 2 * fwd)


# ---------------------------------------------------------------- calibrated tolerances
#: Where the calibration (measured agreement of the unmutated backends) lives.
CALIBRATION_FILE = __import__("pathlib").Path(__file__).with_name("calibration.json")
#: tol_ulp = ULP_MARGIN * (largest ULP distance measured over the seeds) + ULP_FLOOR
ULP_MARGIN, ULP_FLOOR = 2.0, 1.0
#: tol_neq = (largest fraction of not-bitwise-equal elements measured) + FRAC_SLACK + FRAC_PER_ELEMENT / size
FRAC_SLACK, FRAC_PER_ELEMENT = 0.05, 3.0

_calibration_cache: dict | None = None


def calibration() -> dict:
    """``{"seeds": [...], "entries": {key: {"max_ulp", "neq_frac", "size"}}}`` or empty."""
    global _calibration_cache
    if _calibration_cache is None:
        import json
        import os

        if os.environ.get("DUALPREC_CONFORMANCE_UNCALIBRATED"):  # calibrate.py measuring afresh
            _calibration_cache = {"seeds": [], "entries": {}}
            return _calibration_cache
        try:
            _calibration_cache = json.loads(CALIBRATION_FILE.read_text())
        except (OSError, ValueError):
            _calibration_cache = {"seeds": [], "entries": {}}
    return _calibration_cache


def key(policy: str, model: str, check: str, tensor: str) -> str:
    return f"{policy}|{model}|{check}|{tensor}"


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """The measured agreement of one tensor of one check, and the thresholds built from it."""

    max_ulp: float
    neq_frac: float
    size: int

    @property
    def tol_ulp(self) -> float:
        return ULP_MARGIN * self.max_ulp + ULP_FLOOR

    @property
    def tol_neq(self) -> float:
        return min(1.0, self.neq_frac + FRAC_SLACK + FRAC_PER_ELEMENT / max(self.size, 1))

    def judge(self, st) -> str | None:
        """None when ``st`` (numerics.Stats) is within the thresholds, else why not."""
        if not st.ok_shape:
            return "shape mismatch"
        if st.nan_mismatch:
            return f"{st.nan_mismatch} non-finite mismatches"
        if st.max_ulp > self.tol_ulp:
            return f"{st.max_ulp:.3g} ULP of {st.dtype} > calibrated {self.tol_ulp:.3g}"
        if st.neq_frac > self.tol_neq:
            return (f"{st.neq_frac:.1%} of elements not bitwise equal > calibrated {self.tol_neq:.1%} "
                    f"(max {st.max_ulp:.3g} ULP of {st.dtype})")
        return None


def calibrated(policy: str, model: str, check: str, tensor: str) -> Calibrated | None:
    e = calibration()["entries"].get(key(policy, model, check, tensor))
    return None if e is None else Calibrated(e["max_ulp"], e["neq_frac"], e["size"])
