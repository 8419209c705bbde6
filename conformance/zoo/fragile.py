"""The seeded fragile model (fragile_torch.py, fragile_flax.py) as a ModelSpec.  Kept out of
``ZOO`` so the conformance matrix does not run it; ``dualprec diagnose --model fragile``
and the diagnose tests use it."""

from __future__ import annotations

from ..tolerances import ModelShape
from . import ModelSpec


def _torch():
    from .fragile_torch import Fragile

    return Fragile()


def _flax():
    from .fragile_flax import Fragile

    return Fragile()


FRAGILE = ModelSpec("fragile", (4, 8, 16), 8, ModelShape(n_round=12, n_reduce=32, n_layers=6),
                    build_torch=_torch, build_flax=_flax)

#: the modules seeded fragile under each kind of policy
SEEDED = {"16-mixed": ("scores", "norm"), "nf4": ("outlier", "scores"), "fp8": ("outlier", "scores")}
