"""The public torch <-> Flax converter (conformance.weights) on a GPT-style LM with a causal
mask buffer and an LM head tied to the token embedding."""

import jax
import numpy as np
import pytest
import torch
from gpt_pair import FlaxGPT, TorchGPT, data

from conformance import WeightMap, flax_to_torch, torch_to_flax
from conformance.weights import KIND_RULES, WeightMapError, flatten_flax


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return TorchGPT()


def test_the_map_reads_ties_and_buffers_from_the_module(gpt):
    wm = WeightMap.from_torch(gpt)
    assert wm.ties == {"lm_head.weight": "tok.weight"}
    assert wm.ignored == {"blocks.0.attn.mask", "blocks.1.attn.mask"}
    assert wm.flax_name("tok.weight") == "tok/embedding"
    assert wm.rules["tok.weight"].layout == "same"               # an Embedding is not transposed
    assert wm.flax_name("blocks.1.attn.qkv.weight") == "blocks_1/attn/qkv/kernel"
    assert wm.rules["blocks.1.attn.qkv.weight"].layout == "linear"
    assert wm.flax_name("ln_f.weight") == "ln_f/scale"


def test_converted_params_are_the_flax_models_own_and_give_torchs_logits(gpt):
    ids, _ = data()
    own = FlaxGPT().init(jax.random.PRNGKey(0), ids)["params"]
    params = torch_to_flax(gpt, flax_params=own)
    assert {p: np.shape(v) for p, v in flatten_flax(params).items()} == \
        {p: np.shape(v) for p, v in flatten_flax(own).items()}  # same tree, nothing extra, nothing missing
    with torch.no_grad():
        want = gpt(torch.from_numpy(ids)).numpy()
    got = np.asarray(FlaxGPT().apply({"params": params}, ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_round_trip_torch_flax_torch_is_bit_for_bit(gpt):
    wm = WeightMap.from_torch(gpt)
    state = flax_to_torch(torch_to_flax(gpt, wm), wm)
    want = {k: v.detach().numpy() for k, v in gpt.state_dict().items() if k not in wm.ignored}
    assert set(state) == set(want)  # the tied alias restored, the buffers (no counterpart) left out
    for k in want:
        assert state[k].dtype == want[k].dtype and state[k].tobytes() == want[k].tobytes(), k
    # and it loads: strict=False for the buffers, which stay the module's own
    fresh = TorchGPT()
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert sorted(missing) == sorted(wm.ignored) and not unexpected
    assert fresh.lm_head.weight is fresh.tok.weight
    assert all(torch.equal(fresh.state_dict()[k], gpt.state_dict()[k]) for k in gpt.state_dict())


def test_none_is_no_counterpart_for_buffers_only(gpt):
    wm = WeightMap.from_torch(gpt, {"blocks.0.attn.mask": None})
    assert "blocks.0.attn.mask" in wm.ignored
    with pytest.raises(WeightMapError, match="blocks.0.mlp.fc1.weight is a trained parameter"):
        WeightMap.from_torch(gpt, {"blocks.0.mlp.fc1.weight": None})
    with pytest.raises(WeightMapError, match="is a buffer"):
        WeightMap.from_torch(gpt, {"blocks.0.attn.mask": "blocks_0/attn/mask"})
    pattern = WeightMap.from_torch(gpt, {"blocks.*.attn.mask": None})
    assert pattern.ignored == wm.ignored | {"blocks.1.attn.mask"}
    with pytest.raises(WeightMapError, match="blocks.0.mlp.fc1.weight is a trained parameter"):
        WeightMap.from_torch(gpt, {"blocks.*.mlp.fc1.weight": None})
    with pytest.raises(WeightMapError, match="pattern 'head.*' matches no torch tensor"):
        WeightMap.from_torch(gpt, {"head.*": None})
    with pytest.raises(WeightMapError, match="names no torch tensor"):
        WeightMap.from_torch(gpt, {"blocks.9.attn.qkv.weight": "x/kernel"})


def test_a_tied_alias_may_name_its_canonical_path_but_no_other(gpt):
    wm = WeightMap.from_torch(gpt, {"lm_head.weight": "tok/embedding"})
    assert wm.ties == {"lm_head.weight": "tok.weight"} and "lm_head.weight" not in wm.rules
    with pytest.raises(WeightMapError, match="shares storage with tok.weight"):
        WeightMap.from_torch(gpt, {"lm_head.weight": ("lm_head/kernel", "linear")})


def test_an_unmatched_path_names_the_entry_to_add(gpt):
    ids, _ = data()
    own = FlaxGPT().init(jax.random.PRNGKey(0), ids)["params"]
    own = dict(own, head_ln=own["ln_f"])
    del own["ln_f"]
    with pytest.raises(WeightMapError) as e:
        torch_to_flax(gpt, flax_params=own)
    msg = str(e.value)
    assert msg.startswith("torch parameters without a Flax counterpart: ['ln_f.bias', 'ln_f.weight']")
    assert '"ln_f.weight": "head_ln/scale"' in msg and "\\'" not in msg  # plain text, not a repr


def test_kind_rules_are_documented_and_overridable():
    class Scale(torch.nn.Module):  # a user layer whose 2-D weight Flax keeps as is
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = Scale()

    assert KIND_RULES["Linear"]["weight"] == ("kernel", "linear")
    by_ndim = torch_to_flax(Net())
    assert by_ndim["s"]["kernel"].shape == (3, 2)  # the fallback: a 2-D weight is a Dense kernel
    own = torch_to_flax(Net(), kind_rules={"Scale": {"weight": ("w", "same")}})
    assert np.array_equal(own["s"]["w"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="layout 'transposed' is not one of"):
        torch_to_flax(Net(), kind_rules={"Scale": {"weight": ("w", "transposed")}})


def test_nnx_module_and_state_both_ways_bit_for_bit(gpt):
    """torch -> an nnx GPT (nnx's list spelling blocks/0/... resolved) -> torch, bit for bit,
    from the module and from its nnx.State; the nnx model then computes torch's logits."""
    from flax import nnx
    from gpt_nnx import NnxGPT

    model = NnxGPT()
    wm = WeightMap.from_torch(gpt)
    params = torch_to_flax(gpt, wm, flax_params=model)
    assert 0 in params["blocks"] and params["blocks"][1]["attn"]["qkv"]["kernel"].shape == (32, 96)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    want = {k: v.detach().numpy() for k, v in gpt.state_dict().items() if k not in wm.ignored}
    for source in (model, nnx.state(model, nnx.Param)):
        back = flax_to_torch(source, wm)
        assert set(back) == set(want)
        for k in want:
            assert back[k].dtype == want[k].dtype and back[k].tobytes() == want[k].tobytes(), k
    ids, _ = data()
    with torch.no_grad():
        logits = gpt(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), logits, rtol=1e-5, atol=1e-5)


def test_nnx_tree_missing_a_module_names_the_entry(gpt):
    from flax import nnx
    from gpt_nnx import NnxGPT

    tree = nnx.to_pure_dict(nnx.state(NnxGPT(), nnx.Param))
    del tree["ln_f"]
    with pytest.raises(WeightMapError, match=r"without a Flax counterpart: \['ln_f\.bias', 'ln_f\.weight'\].*weight_map="):
        torch_to_flax(gpt, flax_params=tree)
