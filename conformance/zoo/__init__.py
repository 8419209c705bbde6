"""The model zoo: the same small models in PyTorch and Flax, with seeded weights and data.

A :class:`ModelSpec` is everything the suite needs to run one model in both frameworks:
builders, the canonical (torch-layout) weights, a batch of inputs and labels, how the JAX
side lays out activations (the CNN is NHWC there), and the shape facts the tolerance
formula uses.  Framework modules are imported only when a builder runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..tolerances import ModelShape


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]      # torch layout, batch first
    n_classes: int
    shape: ModelShape
    channels_last_in_jax: bool = False
    build_torch: Callable | None = None
    build_flax: Callable | None = None
    input_dtype: str = "float32"      # integer inputs (token ids) are passed through uncast
    vocab: int = 0                    # the token-id range of integer inputs
    class_axis: int = 1               # the classes' axis of a >2-D output (torch layout): 1 as
                                      # torch's cross_entropy, -1 for LM logits [B, T, V]

    def torch_module(self):
        if self.build_torch is not None:
            return self.build_torch()
        from . import torch_models

        return torch_models.build(self.name)

    def flax_module(self):
        if self.build_flax is not None:
            return self.build_flax()
        from . import flax_models

        return flax_models.build(self.name)

    def batch(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (float32, torch layout) and integer labels, the same for both backends."""
        rng = np.random.default_rng(1000 + seed)
        if np.issubdtype(np.dtype(self.input_dtype), np.integer):
            x = rng.integers(0, self.vocab, size=self.input_shape).astype(self.input_dtype)
        else:
            x = rng.standard_normal(self.input_shape).astype(np.float32)
        y = rng.integers(0, self.n_classes, size=self.input_shape[0]).astype(np.int64)
        return x, y

    def to_jax_layout(self, a: np.ndarray) -> np.ndarray:
        if self.channels_last_in_jax and a.ndim == 4:
            return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))
        return a

    def from_jax_layout(self, a: np.ndarray) -> np.ndarray:
        if self.channels_last_in_jax and a.ndim == 4:
            return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))
        return a


def canonical_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights in torch layout: torch's own init, so the scales are realistic."""
    import torch

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        module = spec.torch_module()
    return {k: v.detach().to(torch.float32).numpy().copy() for k, v in module.state_dict().items()}


# Rounding stages: per matmul 1, per activation 1, per norm 1; the attention path adds the
# score matmul, softmax and the probs @ v matmul.
ZOO: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", (8, 16), 8, ModelShape(n_round=5, n_reduce=32, n_layers=3)),
    "transformer": ModelSpec("transformer", (4, 8, 32), 8, ModelShape(n_round=12, n_reduce=128, n_layers=6)),
    "cnn": ModelSpec("cnn", (4, 3, 12, 12), 10, ModelShape(n_round=9, n_reduce=72, n_layers=3),
                     channels_last_in_jax=True),
    # the transformer's rounding stages with the norms and attention written op by op
    "opbyop": ModelSpec("opbyop", (4, 8, 32), 8, ModelShape(n_round=12, n_reduce=64, n_layers=6)),
}

MODELS = tuple(ZOO)


def get(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; the zoo has {', '.join(ZOO)}") from None
