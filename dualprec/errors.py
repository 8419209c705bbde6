"""The errors of dualprec (spec layer and both backends) and the "did you mean" helper.

Both backends raise these very classes and re-export them, so ``except UnsupportedPolicyError``
catches the refusal whichever backend raised it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["PolicyError", "UnsupportedPolicyError", "CheckpointError", "QuantizationError",
           "NonFiniteGradientError", "did_you_mean", "closest"]


class PolicyError(ValueError):
    """An invalid precision policy: names the offending token and, where one is near, the fix."""


class UnsupportedPolicyError(PolicyError, NotImplementedError):
    """A valid policy that needs a feature this backend does not carry out (yet)."""


class CheckpointError(PolicyError):
    """A precision checkpoint that cannot be loaded: truncated, tampered with, of another format
    or version, or written under another policy."""


class QuantizationError(PolicyError):
    """A model, parameter tree or checkpoint that cannot be quantized, loaded or used as asked
    (both backends' quant modules raise this one class)."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step`` under ``nonfinite=raise``: names the first parameter whose gradient
    is not finite."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


def closest(token: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The up to ``n`` candidates closest to ``token`` (case-insensitive), best first."""
    pool = sorted(set(candidates))
    lowered = {c.lower(): c for c in pool}
    return [lowered[m] for m in difflib.get_close_matches(token.lower(), list(lowered), n=n, cutoff=cutoff)]


def did_you_mean(token: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest candidate, or '' when none is close."""
    match = closest(token, candidates, n=1)
    if not match:
        return ""
    return f' (did you mean "{match[0]}"?)'
