"""Weight transfer between torch and Flax layouts, both ways, on every zoo model."""

import jax
import numpy as np
import pytest
import torch

from conformance.weights import Rule, WeightMap
from conformance.zoo import ZOO, canonical_weights


def _torch_out(spec, weights, x):
    m = spec.torch_module()
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", list(ZOO))
def test_torch_to_flax_gives_the_same_function(name):
    spec = ZOO[name]
    w = canonical_weights(spec)
    wm = WeightMap.auto({k: v.shape for k, v in w.items()})
    x, _ = spec.batch()
    out_flax = np.asarray(spec.flax_module().apply({"params": wm.to_flax(w)}, spec.to_jax_layout(x)))
    np.testing.assert_allclose(out_flax, _torch_out(spec, w, x), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", list(ZOO))
def test_flax_to_torch_gives_the_same_function(name):
    spec = ZOO[name]
    x, _ = spec.batch()
    params = spec.flax_module().init(jax.random.PRNGKey(3), spec.to_jax_layout(x))["params"]
    shapes = {k: v.shape for k, v in canonical_weights(spec).items()}
    state = WeightMap.auto(shapes).to_torch(params)
    assert {k: v.shape for k, v in state.items()} == shapes
    out_flax = np.asarray(spec.flax_module().apply({"params": params}, spec.to_jax_layout(x)))
    np.testing.assert_allclose(_torch_out(spec, state, x), out_flax, rtol=2e-5, atol=2e-6)


def test_layouts_are_the_documented_permutations():
    rng = np.random.default_rng(0)
    lin, conv = rng.standard_normal((5, 3)), rng.standard_normal((8, 3, 2, 4))  # [out,in], OIHW
    wm = WeightMap.auto({"fc.weight": lin.shape, "c.weight": conv.shape, "ln.weight": (3,), "fc.bias": (5,)})
    flax = wm.to_flax({"fc.weight": lin, "c.weight": conv, "ln.weight": np.ones(3), "fc.bias": np.zeros(5)})
    assert flax["fc"]["kernel"].shape == (3, 5) and flax["fc"]["kernel"][2, 4] == lin[4, 2]
    assert flax["c"]["kernel"].shape == (2, 4, 3, 8)  # HWIO
    assert flax["c"]["kernel"][1, 3, 2, 7] == conv[7, 2, 1, 3]
    assert set(flax["ln"]) == {"scale"}
    back = wm.to_torch(flax)
    assert np.array_equal(back["c.weight"], conv) and np.array_equal(back["fc.weight"], lin)


def test_overrides_and_missing_rules():
    emb = np.arange(12.0).reshape(4, 3)
    wm = WeightMap.auto({"embed.weight": emb.shape}, {"embed.weight": "embed/embedding"})
    assert np.array_equal(wm.to_flax({"embed.weight": emb})["embed"]["embedding"], emb)  # not transposed
    with pytest.raises(KeyError, match="no weight-map rule"):
        wm.to_flax({"other.weight": emb})
    with pytest.raises(KeyError, match="lack embed/embedding"):
        wm.to_torch({"embed": {}})
    assert Rule(("k",), "conv1d").to_torch(Rule(("k",), "conv1d").to_flax(np.ones((2, 3, 4)))).shape == (2, 3, 4)
