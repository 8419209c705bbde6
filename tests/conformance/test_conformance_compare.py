"""compare() on an ordinary model: token ids, a ModuleList, and a mapping that cannot match."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
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


# ---------------------------------------------------------------- a GPT-style LM as it is
from gpt_pair import FlaxGPT, TorchGPT, data  # noqa: E402

from conformance.compare import Comparison, infer_class_axis  # noqa: E402
from conformance.records import Record  # noqa: E402


@pytest.mark.slow
def test_gpt_with_mask_buffer_tied_head_and_lm_logits_runs_unchanged(real_backends):
    """No weight_map at all: the mask buffers are left out, the tied head found from shared
    storage, the [B, T, V] logits' class axis inferred from targets [B, T]."""
    torch.manual_seed(0)
    ids, y = data()
    result = compare(TorchGPT(), FlaxGPT(), None, "32-true", ids, targets=y, steps=1, backends=real_backends)
    assert result.ok, result.explain()
    assert {r.check for r in result.records} >= {"forward", "layers", "gradients", "loss", "train-loss", "update"}
    assert all(r.status == "pass" for r in result.records)
    grads = next(r for r in result.records if r.check == "gradients").detail["per_tensor"]
    assert "tok.weight" in grads and "lm_head.weight" not in grads  # the tied tensor, once
    loss = next(r for r in result.records if r.check == "loss").detail
    torch.manual_seed(0)
    with torch.no_grad():  # per token over the V=64 classes of the last axis, as an LM trains
        want = torch.nn.functional.cross_entropy(TorchGPT()(torch.from_numpy(ids)).reshape(-1, 64),
                                                 torch.from_numpy(y).reshape(-1)).item()
    for side in ("torch", "jax"):
        assert abs(loss[side]["loss"] - want) <= 1e-5 * want and abs(loss[side]["float64"] - want) <= 1e-5 * want
    text = result.explain()
    assert "lm_head.weight = tok.weight" in text and "blocks.0.attn.mask, blocks.1.attn.mask" in text


def test_weight_map_entries_are_checked_before_anything_runs():
    torch.manual_seed(0)
    ids, y = data()
    bad = compare(TorchGPT(), FlaxGPT(), {"blocks.0.mlp.fc1.weight": None}, "32-true", ids, targets=y,
                  backends=(None, None))
    assert [r.status for r in bad.records] == ["error"]
    assert "blocks.0.mlp.fc1.weight is a trained parameter" in bad.explain()


def test_class_axis_is_inferred_or_asked_for():
    assert infer_class_axis((8, 5), (8,)) == 1
    assert infer_class_axis((8, 16, 64), (8, 16)) == -1      # LM logits, optax's layout
    assert infer_class_axis((8, 10, 12, 12), (8, 12, 12)) == 1  # segmentation, torch's layout
    with pytest.raises(ValueError, match="could be at axis 1 or -1; pass compare"):
        infer_class_axis((8, 16, 16), (8, 16))
    with pytest.raises(ValueError, match="no axis of the output"):
        infer_class_axis((8, 16, 64), (8, 15))


def test_explain_says_each_problem_once_in_full_within_80_columns():
    long = ("raised WeightMapError: torch parameters without a Flax counterpart: ['blocks.0.attn.mask', "
            "'blocks.1.attn.mask']; Flax parameters no torch name maps to: []. Pass weight_map={...}")
    recs = [Record("32-true", "m", c, "tolerance", "error", reason=long)
            for c in ("param-dtypes", "param-values", "forward", "layers", "gradients", "loss", "train-loss", "update")]
    recs.append(Record("32-true", "m", "cast-input", "bit-exact", "pass"))
    text = Comparison(recs, ["no Flax counterpart, not compared: a.mask"]).explain()
    lines = text.splitlines()
    assert lines[0] == "1 pass, 8 error"
    assert max(map(len, lines)) <= 80
    assert text.count("torch parameters without") == 1
    assert lines[1].startswith("error param-dtypes, param-values, forward, layers, gradients, loss,")
    words = " ".join(ln.strip() for ln in lines[1:-1])
    assert long in words  # every word there, none cut
    assert lines[-1] == "note: no Flax counterpart, not compared: a.mask"


@pytest.mark.slow
def test_calibrate_reports_the_envelope_of_a_pair_against_the_bounds():
    from gpt_pair import FlaxGPT, TorchGPT, data

    from conformance import calibrate

    env = calibrate(TorchGPT, FlaxGPT(), None, "bf16-mixed", lambda s: data(seed=s), seeds=(0, 1))
    assert not env.failed, env.table()
    assert {"layers", "forward"} <= set(env.rows)
    assert all(0.0 <= row[0] <= 1.0 for row in env.rows.values()), env.table()
    assert len(env.runs) == 2 and "layers" in env.table()
    bug = calibrate(TorchGPT, FlaxGPT(bug="softmax-half"), None, "bf16-mixed", lambda s: data(seed=s), seeds=(0,))
    assert bug.failed == {"layers": [0]} and bug.rows["layers"][0] > 1.0, bug.table()
