"""Backends the suite can drive.  Each implements :class:`base.Backend`; a third framework
plugs in by implementing it and being passed to ``matrix.run(backends=...)``."""

from .base import Backend, Optim, Session, StepInfo

__all__ = ["Backend", "Optim", "Session", "StepInfo", "default_backends"]


def default_backends():
    """(torch, jax): torch is the reference side of each comparison."""
    from .jax_backend import JaxBackend
    from .torch_backend import TorchBackend

    return TorchBackend(), JaxBackend()
