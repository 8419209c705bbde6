"""Adam/AdamW state torch <-> optax through the converter's WeightMap, in the cross-framework
training checkpoint's backend-neutral layout, on the GPT (tied head, buffers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from gpt_pair import FlaxGPT, TorchGPT, data

from conformance import WeightMap, torch_to_flax
from conformance.weights import WeightMapError, optimizer_state_to_flax, optimizer_state_to_torch
from dualprec_torch import checkpoint as torch_ckpt


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TorchGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, y = data()
    for _ in range(2):
        opt.zero_grad()
        logits = model(torch.from_numpy(ids))
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1)).backward()
        opt.step()
    return model, opt


def test_adamw_state_torch_optax_torch_bit_for_bit(trained):
    model, opt = trained
    wm = WeightMap.from_torch(model)
    ids, _ = data()
    params = jax.tree_util.tree_map(jnp.asarray, torch_to_flax(
        model, wm, flax_params=FlaxGPT().init(jax.random.PRNGKey(0), ids)["params"]))
    state = torch_ckpt.optimizer_state(model, opt)
    assert state["kind"] == "adam" and state["step"] == 2 and "lm_head.weight" not in state["slots"]["exp_avg"]
    tx = optax.adamw(1e-3)
    opt_state = optimizer_state_to_flax(state, params, tx.init(params), wm)
    adam = opt_state[0]
    assert int(adam.count) == 2
    want = state["slots"]["exp_avg"]["blocks.1.attn.qkv.weight"].numpy()
    assert np.asarray(adam.mu["blocks_1"]["attn"]["qkv"]["kernel"]).tobytes() == np.ascontiguousarray(want.T).tobytes()
    assert np.array_equal(adam.nu["tok"]["embedding"], state["slots"]["exp_avg_sq"]["tok.weight"].numpy())
    back = optimizer_state_to_torch(params, opt_state, wm)
    assert back["kind"] == "adam" and back["step"] == 2
    for slot, tensors in state["slots"].items():
        assert set(back["slots"][slot]) == set(tensors)
        for name, t in tensors.items():
            assert back["slots"][slot][name].tobytes() == t.numpy().tobytes(), (slot, name)
    # and into a fresh torch AdamW: the same tensors, the same step
    fresh = TorchGPT()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    torch_ckpt.load_optimizer_state(fresh, opt2, back)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), (n, k)


def test_a_map_the_checkpoint_rules_cannot_follow_is_refused(trained):
    model, opt = trained
    ids, _ = data()
    params = FlaxGPT().init(jax.random.PRNGKey(0), ids)["params"]
    wm = WeightMap.from_torch(model, {"ln_f.bias": "ln_f/bias"})
    wm.rules["ln_f.bias"] = type(wm.rules["ln_f.bias"])(("ln_f", "bias"), "linear")  # a wrong layout
    with pytest.raises(WeightMapError, match="ln_f/bias"):
        optimizer_state_to_flax(torch_ckpt.optimizer_state(model, opt), params, optax.adam(1e-3).init(params), wm)
