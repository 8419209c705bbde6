"""The one error type of the spec, and the "did you mean" helper every parser path uses."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["PolicyError", "did_you_mean"]


class PolicyError(ValueError):
    """An invalid precision policy: names the offending token and, where one is near, the fix."""


def did_you_mean(token: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest candidate, or '' when none is close."""
    pool = sorted(set(candidates))
    lowered = {c.lower(): c for c in pool}
    match = difflib.get_close_matches(token.lower(), list(lowered), n=1, cutoff=0.6)
    if not match:
        return ""
    return f' (did you mean "{lowered[match[0]]}"?)'
