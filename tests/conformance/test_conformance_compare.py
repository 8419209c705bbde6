"""compare() on an ordinary model: token ids, a ModuleList, and a mapping that cannot match."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

from conformance import compare


class TorchTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 16)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.head = torch.nn.Linear(16, 5)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x.mean(dim=1))


class FlaxTokens(nn.Module):
    def setup(self):
        self.embed = nn.Embed(20, 16)
        self.blocks = [nn.Dense(16) for _ in range(2)]  # linen names them blocks_0, blocks_1
        self.head = nn.Dense(5)

    def __call__(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = jnp.tanh(b(x))
        return self.head(x.mean(axis=1))


class FlaxOtherNames(FlaxTokens):
    def setup(self):
        self.embed = nn.Embed(20, 16)
        self.blocks = [nn.Dense(16) for _ in range(2)]
        self.out = nn.Dense(5)  # torch calls it head

    def __call__(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = jnp.tanh(b(x))
        return self.out(x.mean(axis=1))


def _data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 20, (4, 6)), rng.integers(0, 5, 4)


def test_token_ids_and_module_list_pass_uncast(real_backends):
    torch.manual_seed(0)
    ids, y = _data()
    result = compare(TorchTokens(), FlaxTokens(), None, "32-true", ids, targets=y, steps=1, backends=real_backends)
    assert result.ok, result.explain()
    fwd = next(r for r in result.records if r.check == "forward")
    assert {"blocks.0", "blocks.1", "embed"} <= set(fwd.detail["per_tensor"])  # paired by torch name
    assert not fwd.detail["layers_only_in_one_backend"]


def test_unmatched_paths_are_an_error_naming_the_fix(real_backends):
    torch.manual_seed(0)
    ids, y = _data()
    result = compare(TorchTokens(), FlaxOtherNames(), None, "32-true", ids, targets=y, backends=real_backends)
    errors = [r for r in result.records if r.status == "error"]
    assert errors and not result.ok and not [r for r in result.records if r.status == "fail"]
    assert "head.weight" in errors[0].reason and "out/kernel" in errors[0].reason and "weight_map=" in errors[0].reason
