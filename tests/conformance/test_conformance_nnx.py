"""compare() on a Flax nnx model: the GPT of gpt_pair.py written in nnx (gpt_nnx.py) against
the torch GPT, with the per-layer checks (each nnx submodule's output, a layer run on
torch's input, a block's own ops) named by torch's module names."""

import jax
import numpy as np
import pytest
import torch
from gpt_nnx import NnxGPT
from gpt_pair import TorchGPT, data

from conformance import compare
from conformance.nnx_bridge import as_linen


def test_the_linen_view_has_linens_params_and_the_nnx_models_numbers():
    from flax import nnx
    from gpt_pair import FlaxGPT

    ids, _ = data()
    model = NnxGPT()
    before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    view = as_linen(model)
    variables = view.init(jax.random.PRNGKey(1), ids)
    shapes = jax.tree_util.tree_map(np.shape, variables["params"])
    assert shapes == jax.tree_util.tree_map(np.shape, FlaxGPT().init(jax.random.PRNGKey(0), ids)["params"])
    assert np.array_equal(variables["params"]["blocks_1"]["attn"]["qkv"]["kernel"],
                          before["blocks"][1]["attn"]["qkv"]["kernel"])  # the nnx values, not re-drawn
    np.testing.assert_array_equal(np.asarray(view.apply(variables, ids)), np.asarray(model(ids)))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                     jax.tree_util.tree_leaves(after)))  # untouched


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed"])
def test_compare_takes_an_nnx_model_layer_by_layer(real_backends, policy):
    torch.manual_seed(0)
    ids, y = data()
    r = compare(TorchGPT(), NnxGPT(), None, policy, ids, targets=y, steps=1, backends=real_backends)
    assert r.ok and not [x for x in r.records if x.status in ("error", "skip")], r.explain()
    layers = next(x for x in r.records if x.check == "layers").detail["per_tensor"]
    assert {"blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.0.ln1", "blocks.1.attn", "blocks.0.mlp (own ops)",
            "ln_f", "tok"} <= set(layers)


@pytest.mark.slow
@pytest.mark.parametrize("bug,where", [("ln-eps", "blocks.0.ln1"), ("gelu-tanh", "blocks.0.mlp")])
def test_a_planted_nnx_bug_is_named_at_its_layer(real_backends, bug, where):
    torch.manual_seed(0)
    ids, _ = data()
    r = compare(TorchGPT(), NnxGPT(bug=bug), None, "bf16-mixed", ids, backends=real_backends)
    layers = next(x for x in r.records if x.check == "layers")
    assert layers.status == "fail" and layers.where == where, r.explain()
