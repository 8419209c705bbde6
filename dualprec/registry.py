"""What each backend declares it runs: the capability registry `dualprec explain` reads.

A backend module that implements a path registers it with one line, next to the code::

    registry.register("torch", "quantization.nf4", "bitsandbytes Linear4bit subclasses replace nn.Linear")
    registry.register("jax", "fp8.native", lambda p: f"fp8 dot_general, history {p.fp8.history_len}")

A description is a string or a function of the Policy.  A feature nobody registered reads
"not available in this backend", so explain cannot describe a path that does not exist.

A backend also registers the check its ``Precision`` constructor runs to refuse a policy it
cannot carry out (`register_check`); explain runs that same function, so it says "refused"
exactly where the constructor raises `UnsupportedPolicyError`, with the constructor's reason.
The registrations run when the backend package is imported: the spec layer never imports a
backend.  A backend nobody imported in this process has no entries, and `describe` says so
(`not_loaded`): import ``dualprec_torch`` / ``dualprec_jax`` first (the ``dualprec explain``
command does that for the backends installed).
"""

from __future__ import annotations

from collections.abc import Callable

from .policy import FP8_ENGINES, QUANT_MODES, Policy

__all__ = ["register", "registered", "loaded", "not_loaded", "describe", "register_check", "refusal", "FEATURES",
           "BACKENDS", "NOT_AVAILABLE", "REFUSED"]

NOT_AVAILABLE = "not available in this backend"
REFUSED = "refused by this backend's Precision"
#: backend name -> the package that registers it (named in messages only, never imported here)
BACKENDS = {"torch": "dualprec_torch", "jax": "dualprec_jax"}

#: every feature a backend may declare; explain asks for these
FEATURES = (("mechanism", "loss_scale", "master_weights", "nonfinite", "reduce")
            + tuple(f"quantization.{m}" for m in QUANT_MODES)
            + tuple(f"fp8.{e}" for e in FP8_ENGINES if e != "auto"))

_REGISTRY: dict[tuple[str, str], str | Callable[[Policy], str]] = {}
_CHECKS: dict[str, Callable[[Policy], None]] = {}
_LOADED: set[str] = set()


def register(backend: str, feature: str, description: str | Callable[[Policy], str]) -> None:
    """Declare that a backend runs a feature, with the description explain shows.

    Args:
        backend: "torch" or "jax".
        feature: One of `FEATURES` ("mechanism", "quantization.nf4", "fp8.native", ...).
        description: A string, or a function of the Policy returning one.

    Raises:
        ValueError: An unknown backend or feature.
    """
    _known(backend)
    if feature not in FEATURES:
        raise ValueError(f"registry: unknown feature {feature!r}; one of {', '.join(FEATURES)}")
    _REGISTRY[(backend, feature)] = description
    _LOADED.add(backend)


def _known(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"registry: unknown backend {backend!r}; one of {', '.join(BACKENDS)}")


def loaded(backend: str) -> bool:
    """Whether a backend registered anything in this process (its package was imported).

    Args:
        backend: "torch" or "jax".

    Returns:
        True once the backend package has been imported.

    Raises:
        ValueError: An unknown backend.
    """
    _known(backend)
    return backend in _LOADED


def not_loaded(backend: str) -> str:
    """The sentence `describe` returns for a backend whose package was not imported.

    Args:
        backend: "torch" or "jax".

    Returns:
        A sentence naming the package to import.
    """
    _known(backend)
    return (f"{BACKENDS[backend]} is not imported in this process: import {BACKENDS[backend]} first "
            "(the spec layer never imports a backend; `dualprec explain` on the command line does)")


def registered(backend: str, feature: str) -> bool:
    """Whether a backend declared a feature (it declares them when its package is imported).

    Args:
        backend: "torch" or "jax".
        feature: One of `FEATURES`.

    Returns:
        False when the backend was not imported or did not register the feature.
    """
    _known(backend)
    return (backend, feature) in _REGISTRY


def describe(backend: str, feature: str, policy: Policy) -> str:
    """The backend's own description of a feature under a policy.

    Args:
        backend: "torch" or "jax".
        feature: One of `FEATURES`.
        policy: The policy a callable description is called with.

    Returns:
        The registered description; `NOT_AVAILABLE` when the backend registered none, or
        `not_loaded` (a sentence naming the package to import) when it was not imported.
    """
    if not loaded(backend):
        return not_loaded(backend)
    entry = _REGISTRY.get((backend, feature))
    if entry is None:
        return NOT_AVAILABLE
    return entry(policy) if callable(entry) else entry


def register_check(backend: str, check: Callable[[Policy], None]) -> None:
    """Declare the check a backend's Precision constructor runs on its policy.

    Args:
        backend: "torch" or "jax".
        check: Raises `UnsupportedPolicyError`, naming the reason, for a policy the backend
            does not carry out; returns None otherwise.

    Raises:
        ValueError: An unknown backend.
    """
    _known(backend)
    _CHECKS[backend] = check
    _LOADED.add(backend)


def refusal(backend: str, policy: Policy) -> str | None:
    """Why a backend's Precision refuses a policy.

    Args:
        backend: "torch" or "jax".
        policy: The policy.

    Returns:
        The message of the `UnsupportedPolicyError` the registered check raises, or None
        when it accepts the policy, no check is registered, or the backend was not imported.
    """
    from .errors import UnsupportedPolicyError

    _known(backend)
    check = _CHECKS.get(backend)
    if check is None:
        return None
    try:
        check(policy)
    except UnsupportedPolicyError as e:
        return str(e)
    return None
