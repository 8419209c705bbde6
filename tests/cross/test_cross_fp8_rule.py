"""The one FP8 rule of both backends (docs/fp8.md, "The rule"): operands quantized as the layer
receives them (the weight from the parameter, not its compute-dtype copy), the bias added in
float32 and the output rounded once, and a recipe step is an applied optimizer step under
Precision (a backward whose gradients are discarded, or a skipped step, leaves the state)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from dualprec_jax import Precision as JPrecision  # noqa: E402
from dualprec_jax import fp8 as jfp8  # noqa: E402
from dualprec_torch import Precision as TPrecision  # noqa: E402
from dualprec_torch import fp8 as tfp8  # noqa: E402

POLICY = "bf16-mixed,fp8=delayed(history=4)"


def _torch_model(w, b):
    m = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0]))
    m[0].weight.data = torch.from_numpy(w.copy())
    m[0].bias.data = torch.from_numpy(b.copy())
    return m


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="0")(x)


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16)).astype(np.float32) * np.float32(1.37)  # not bf16-exact
    w = (rng.standard_normal((8, 16)) * 0.3).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    cs = [rng.standard_normal((6, 8)).astype(np.float32) * s for s in (1.0, 30.0, 0.2)]
    return x, w, b, cs


def test_torch_and_jax_record_the_same_amaxes_through_precision():
    x, w, b, cs = _data()
    # torch: lr 0, so the parameters stay put and only the FP8 state moves
    tp = TPrecision(POLICY)
    m = _torch_model(w, b)
    m, opt = tp.setup(m, torch.optim.SGD(m.parameters(), lr=0.0))
    for c in cs:
        with tp.autocast():
            y = m(torch.from_numpy(x))
        tp.backward((y.float() * torch.from_numpy(c)).sum())
        tp.step(opt)
        opt.zero_grad()
    t_state = {k: v.numpy() for k, v in tfp8.state_tensors(m).items()}
    # JAX: the same layer through Precision.apply
    jp = JPrecision(POLICY)
    model = _Dense()
    v = jp.init(model, jax.random.PRNGKey(0), x)
    v = {**v, "params": {"0": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}}}
    for c in cs:
        g = jax.grad(lambda v: jnp.sum(jp.apply(model, v, x).astype(jnp.float32) * c))(v)
        v = jfp8.apply_fp8_grads(v, g)
    j_state = jfp8.state_tensors(v)
    assert sorted(t_state) == sorted(j_state)
    for k in t_state:
        assert np.array_equal(t_state[k].view(np.uint32), np.asarray(j_state[k]).view(np.uint32)), k
    # and the rule's amaxes: the float32 input, the float32 parameter, the bf16 output gradient
    hist = t_state["fp8.0.input.amax_history"]
    assert hist[0] == np.abs(x).max()
    assert t_state["fp8.0.weight.amax_history"][0] == np.abs(w).max()
    bf16 = ml_dtypes.bfloat16
    assert t_state["fp8.0.grad_output.amax_history"][0] == np.abs(cs[-1].astype(bf16).astype(np.float32)).max()


def test_discarded_backward_is_not_a_recipe_step():
    x, w, b, cs = _data()
    tp = TPrecision(POLICY)
    m = _torch_model(w, b)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, opt = tp.setup(m, opt)
    before = {k: v.clone() for k, v in tfp8.state_tensors(m).items()}
    with tp.autocast():
        loss = m(torch.from_numpy(x)).float().square().mean()
    tp.backward(loss)
    saved = tp.state_dict()  # mid-iteration: the state the iteration started from
    assert all(torch.equal(torch.as_tensor(saved["extensions"]["fp8"][k]), before[k]) for k in before)
    tp.load_state_dict(saved)  # discard the backward (what a gradient-only evaluation does)
    opt.zero_grad()
    after = tfp8.state_tensors(m)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # an applied step is a recipe step
    with tp.autocast():
        loss = m(torch.from_numpy(x)).float().square().mean()
    tp.backward(loss)
    tp.step(opt)
    assert not torch.equal(tfp8.state_tensors(m)["fp8.0.input.amax_history"], before["fp8.0.input.amax_history"])


def test_skipped_step_leaves_the_fp8_state():
    x, w, b, _ = _data()
    tp = TPrecision("bf16-mixed,fp8=delayed(history=4),loss_scale=dynamic")
    m = _torch_model(w, b)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m, opt = tp.setup(m, opt)
    before = {k: v.clone() for k, v in tfp8.state_tensors(m).items()}
    with tp.autocast():
        loss = m(torch.from_numpy(x)).float().sum() * float("inf")
    tp.backward(loss)
    assert tp.step(opt) is False
    after = tfp8.state_tensors(m)
    assert all(torch.equal(after[k], before[k]) for k in before)
