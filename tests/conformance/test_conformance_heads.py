"""Attention head splits in the converter: torch's packed q/k/v projections <-> Flax's
per-head DenseGeneral kernels [d, heads, head_dim] and output kernel [heads, head_dim, d]."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gpt_pair import D, FlaxGPT, H, T, TorchGPT, data

from conformance import WeightMap, flax_to_torch, torch_to_flax
from conformance.weights import attention_rules


class TorchMHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class FlaxMHA(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D, out_features=D, name="attn")(x)


def test_torch_multihead_attention_is_flax_multi_head_dot_product_attention():
    torch.manual_seed(0)
    tm = TorchMHA()
    with torch.no_grad():  # nonzero biases, so a bias in the wrong place shows
        tm.attn.in_proj_bias.normal_()
        tm.attn.out_proj.bias.normal_()
    x = np.random.default_rng(0).standard_normal((2, T, D)).astype(np.float32)
    own = FlaxMHA().init(jax.random.PRNGKey(0), x)["params"]
    wm = WeightMap.from_torch(tm)
    assert wm.rules["attn.in_proj_weight"].layout == "heads_in" and wm.rules["attn.in_proj_weight"].heads == H
    params = torch_to_flax(tm, wm, flax_params=own)
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, own)
    assert params["attn"]["query"]["kernel"].shape == (D, H, D // H) and params["attn"]["out"]["kernel"].shape == (H, D // H, D)
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    got = np.asarray(FlaxMHA().apply({"params": jax.tree_util.tree_map(jnp.asarray, params)}, x))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    back = flax_to_torch(params, wm)
    for k, v in tm.state_dict().items():
        assert back[k].tobytes() == v.numpy().tobytes(), k


class FlaxSplitAttention(nn.Module):
    """The GPT attention with separate q/k/v DenseGeneral projections and a per-head output."""

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = (nn.DenseGeneral((H, d // H), name=n)(x) for n in ("query", "key", "value"))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // H)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -jnp.inf)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v)
        return nn.DenseGeneral(d, axis=(-2, -1), name="out")(y)


def test_the_gpts_fused_qkv_linear_to_separate_heads_and_back_bit_for_bit():
    torch.manual_seed(0)
    gpt = TorchGPT()
    attn = gpt.blocks[0].attn
    rules = attention_rules(H, "attn", "qkv.weight", "proj.weight")
    wm = WeightMap.from_torch(attn, rules)
    x = np.random.default_rng(1).standard_normal((2, T, D)).astype(np.float32)

    class Wrap(nn.Module):
        @nn.compact
        def __call__(self, x):
            return FlaxSplitAttention(name="attn")(x)

    own = Wrap().init(jax.random.PRNGKey(0), x)["params"]
    params = torch_to_flax(attn, wm, flax_params=own)
    with torch.no_grad():
        want = attn(torch.from_numpy(x)).numpy()
    got = np.asarray(Wrap().apply({"params": jax.tree_util.tree_map(jnp.asarray, params)}, x))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    back = flax_to_torch(params, wm)
    for k, v in attn.state_dict().items():
        if k in wm.ignored:
            continue
        assert back[k].tobytes() == v.numpy().tobytes(), k


def test_gpt_parameters_round_trip_torch_flax_torch_bit_for_bit():
    torch.manual_seed(0)
    gpt = TorchGPT()
    ids, _ = data()
    wm = WeightMap.from_torch(gpt)
    back = flax_to_torch(torch_to_flax(gpt, wm, flax_params=FlaxGPT().init(jax.random.PRNGKey(0), ids)["params"]), wm)
    for k, v in gpt.state_dict().items():
        if k not in wm.ignored:
            assert back[k].tobytes() == v.numpy().tobytes(), k


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed"])
def test_compare_takes_torch_mha_against_flax_mha_without_a_weight_map(real_backends, policy):
    """The head-split rules carry compare(): parameters, gradients and a training step
    mapped through them, every check passing."""
    from conformance import compare

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, T, D)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, D, (2, T))
    r = compare(TorchMHA(), FlaxMHA(), None, policy, x, targets=y, steps=1, class_axis=-1, backends=real_backends)
    assert r.ok and not [x for x in r.records if x.status in ("error", "skip")], r.explain()
    assert {x.check for x in r.records} >= {"gradients", "train-params", "param-values"}
