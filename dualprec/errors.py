"""The errors of dualprec (spec layer and both backends) and the "did you mean" helper.

Both backends raise these very classes and re-export them, so ``except UnsupportedPolicyError``
catches the refusal whichever backend raised it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["PolicyError", "UnsupportedPolicyError", "CheckpointError", "QuantizationError",
           "NonFiniteGradientError", "did_you_mean", "closest", "one_line", "MAX_MESSAGE"]


#: the longest message a PolicyError carries; longer ones keep their start and end
MAX_MESSAGE = 1000


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """A text as one printable line of bounded length, for an error message.

    Args:
        text: The text (anything ``str`` takes).
        limit: About the most characters kept.

    Returns:
        The text with control and other non-printable characters (newlines, ANSI escapes)
        escaped as Python writes them, and an overlong middle (an echoed 10 MB input) cut
        out with a note of how many characters were cut.
    """
    text = str(text)
    cut = 0
    if len(text) > limit:
        keep = limit // 2
        cut = len(text) - 2 * keep
        head, tail = text[:keep], text[-keep:]
    else:
        head, tail = text, ""

    def esc(part: str) -> str:
        if part.isprintable():
            return part
        return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in part)

    out = esc(head) if not cut else f"{esc(head)} ...[{cut} characters cut]... {esc(tail)}"
    if len(out) > 2 * limit:  # escapes can quadruple the length
        out = out[:limit] + f" ...[{len(out) - limit} characters cut]"
    return out


class PolicyError(ValueError):
    """An invalid precision policy: names the offending token and, where one is near, the fix.

    A single string argument becomes one printable line of bounded length (see `one_line`).
    Subclasses: UnsupportedPolicyError, CheckpointError, QuantizationError.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


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
    is not finite.

    The JAX backend's state is functional, so its error carries the state after the skipped
    step (loss scale backed off, as torch's Precision keeps internally):
    ``params, opt_state = err.params, err.opt_state``.

    Args:
        message: The error message.
        parameter: The name of the first parameter with a non-finite gradient.
        params: JAX: the parameters after the skipped step (None from torch).
        opt_state: JAX: the optimizer state after the skipped step (None from torch).
    """

    def __init__(self, message: str, parameter: str | None = None, *, params: Any = None,
                 opt_state: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.params = params
        self.opt_state = opt_state


def closest(token: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The candidates closest to a token, compared case-insensitively.

    Args:
        token: The text to match.
        candidates: The valid names.
        n: At most this many are returned.
        cutoff: The least `difflib` similarity ratio, in [0, 1].

    Returns:
        Up to ``n`` candidates, best first, in their own spelling.
    """
    pool = sorted(set(candidates))
    lowered = {c.lower(): c for c in pool}
    return [lowered[m] for m in difflib.get_close_matches(token.lower(), list(lowered), n=n, cutoff=cutoff)]


def did_you_mean(token: str, candidates: Iterable[str]) -> str:
    """The "did you mean" hint of an error message.

    Args:
        token: The unknown name the user gave.
        candidates: The valid names.

    Returns:
        ' (did you mean "x"?)' for the closest candidate, or '' when none is close (or the
        token is over 100 characters long).
    """
    if len(token) > 100:  # nothing is near a very long token, and difflib is quadratic in it
        return ""
    match = closest(token, candidates, n=1)
    if not match:
        return ""
    return f' (did you mean "{match[0]}"?)'
