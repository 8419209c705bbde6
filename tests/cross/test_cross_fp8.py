"""The torch and JAX native FP8 engines agree: for the same weights, inputs and output
gradients, bit-identical scales and amax histories over many steps (an amax of 0 and
non-finite amaxes among them), equal fp8 codes, GEMM outputs and gradients within
tolerance, and FP8 state that moves from one backend to the other mid-run.  The reference
recipe (`dualprec.ref.fp8`) referees.

Each layer is held on the same input in both backends (its GEMM output is not bit-identical
across frameworks, so a second layer's input amax could differ in the last bit)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the cross-framework FP8 agreement needs torch")
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dualprec.policy import FP8Recipe, Policy  # noqa: E402
from dualprec.ref import fp8 as ref  # noqa: E402
from dualprec.ref.casts import nan_equal  # noqa: E402
from dualprec_jax import Precision  # noqa: E402
from dualprec_jax import fp8 as jfp8
from dualprec_torch import fp8 as tfp8  # noqa: E402

IN, OUT, BATCH, STEPS = 16, 8, 4, 9
POLICIES = {"hybrid": "32-true,fp8=delayed(history_len=4)",
            "e4m3-most_recent-margin": "32-true,fp8=delayed(history_len=3,margin=1,amax_algo=most_recent,format=e4m3)"}


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="fc1")(x)


class _TorchModel(torch.nn.Module):
    def __init__(self, recipe):
        super().__init__()
        self.fc1 = tfp8.FP8Linear(IN, OUT, recipe=recipe)


def _data(seed):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((BATCH, IN)).astype(np.float32) * rng.uniform(0.05, 40) for _ in range(STEPS)]
    cs = [rng.standard_normal((BATCH, OUT)).astype(np.float32) * rng.uniform(0.01, 100) for _ in range(STEPS)]
    xs[2] = np.zeros_like(xs[2])               # input amax 0: previous scale kept
    cs[4] = cs[4].copy()
    cs[4][0, 1] = np.inf  # non-finite output-gradient amaxes
    cs[6] = cs[6].copy()
    cs[6][2, 3] = np.nan
    return xs, cs


def _torch_run(model, xs, cs):
    outs = []
    for x, c in zip(xs, cs):
        xt = torch.tensor(x, requires_grad=True)
        y = model.fc1(xt)
        y.backward(torch.tensor(c))
        outs.append((y.detach().numpy(), xt.grad.numpy(), model.fc1.weight.grad.numpy().T.copy()))
        model.fc1.weight.grad = None
        if model.fc1.bias is not None:
            model.fc1.bias.grad = None
    return outs


def _jax_setup(policy, w, b):
    prec = Precision(policy)
    model = _Dense()
    v = prec.init(model, jax.random.PRNGKey(0), np.zeros((BATCH, IN), np.float32))
    v = {**v, "params": {"fc1": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}}}

    @jax.jit
    def step(v, x, c):
        y, vjp = jax.vjp(lambda v, x: prec.apply(model, v, x), v, x)
        gv, gx = vjp(c)
        return y, gx, gv

    return prec, v, step


def _jax_run(prec, v, step, xs, cs):
    outs = []
    for x, c in zip(xs, cs):
        y, gx, gv = step(v, jnp.asarray(x), jnp.asarray(c))
        outs.append((np.asarray(y), np.asarray(gx), np.asarray(gv["params"]["fc1"]["kernel"])))
        v = jfp8.apply_fp8_grads(v, gv)
    return v, outs


def _np(tensors):
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in tensors.items()}


def _assert_states_equal(a, b, where):
    assert sorted(a) == sorted(b), where
    for k in a:
        assert nan_equal(np.asarray(a[k], np.float32).reshape(np.shape(b[k])), np.asarray(b[k], np.float32)), \
            f"{where}: {k}: {a[k]} vs {b[k]}"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_torch_and_jax_fp8_state_bit_identical_over_steps(name):
    policy = POLICIES[name]
    recipe = Policy.parse(policy).fp8
    torch.manual_seed(0)
    tmodel = _TorchModel(recipe).train()
    w, b = tmodel.fc1.weight.detach().numpy().copy(), tmodel.fc1.bias.detach().numpy().copy()
    xs, cs = _data(1)

    # referee: the reference recipe on the same tensors
    state = ref.fp8_delayed_init(recipe)
    ref_states, ref_ys = [], []
    for x, c in zip(xs, cs):
        xq, wq, _, state = ref.fp8_gemm_qdq(x, w.T, state, recipe, grad_output=c)
        ref_states.append({f"fp8.fc1.{r}.{f}": getattr(state[r], "scale" if f == "scale" else "amax_history")
                           for r in ref.ROLES for f in ("scale", "amax_history")})
        ref_ys.append(xq @ wq + b)

    prec, v, step = _jax_setup(policy, w, b)
    jax_states, jax_outs = [], []
    for x, c in zip(xs, cs):  # one step at a time to compare the state after each
        v, out = _jax_run(prec, v, step, [x], [c])
        jax_outs += out
        jax_states.append(jfp8.state_tensors(v, prec.policy))

    torch_states, torch_outs = [], []
    for x, c in zip(xs, cs):
        torch_outs += _torch_run(tmodel, [x], [c])
        torch_states.append(_np(tfp8.state_tensors(tmodel)))

    for t in range(STEPS):
        _assert_states_equal(jax_states[t], torch_states[t], f"step {t} jax vs torch")
        _assert_states_equal(jax_states[t], ref_states[t], f"step {t} jax vs ref")
        (jy, jgx, jgw), (ty, tgx, tgw) = jax_outs[t], torch_outs[t]
        np.testing.assert_allclose(jy, ty, rtol=1e-5, atol=1e-5 * np.abs(ty).max() + 1e-30)
        np.testing.assert_allclose(jy, ref_ys[t], rtol=1e-5, atol=1e-5 * np.abs(ref_ys[t]).max() + 1e-30)
        if np.isfinite(cs[t]).all():
            np.testing.assert_allclose(jgx, tgx, rtol=1e-5, atol=1e-5 * np.abs(tgx).max() + 1e-30)
            np.testing.assert_allclose(jgw, tgw, rtol=1e-5, atol=1e-5 * np.abs(tgw).max() + 1e-30)
        else:
            assert np.array_equal(np.isfinite(jgx), np.isfinite(tgx))


def test_fp8_codes_equal_across_backends():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((32, 64)) * 100).astype(np.float32)
    x[0, :4] = [1e5, -1e5, np.inf, -np.inf]  # saturate to +-fp8_max
    for fmt in (ref.E4M3, ref.E5M2):
        for scale in (np.float32(1.0), np.float32(3.7), ref.fp8_current_scale(x[1:], fmt)):
            want = ref.quantize_fp8(x, scale, fmt)
            j = np.asarray(jfp8.quantize(jnp.asarray(x), jnp.float32(scale), fmt))
            t = tfp8._quantize(torch.tensor(x), torch.tensor(scale), fmt).view(torch.uint8).numpy()
            assert nan_equal(j, want), (fmt, scale)
            assert np.array_equal(j.view(np.uint8), t), (fmt, scale)


def test_current_scaling_agrees():
    recipe = FP8Recipe(scaling="current")
    torch.manual_seed(1)
    layer = tfp8.FP8Linear(IN, OUT, recipe=recipe)
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    x = np.random.default_rng(3).standard_normal((BATCH, IN)).astype(np.float32)
    c = np.random.default_rng(4).standard_normal((BATCH, OUT)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = layer(xt)
    yt.backward(torch.tensor(c))
    prec, v, step = _jax_setup("32-true,fp8=current", w, b)
    y, gx, _ = step(v, jnp.asarray(x), jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["torch->jax", "jax->torch"])
def test_fp8_state_resumes_across_backends(direction):
    policy = POLICIES["hybrid"]
    torch.manual_seed(0)
    tmodel = _TorchModel(Policy.parse(policy).fp8).train()
    w, b = tmodel.fc1.weight.detach().numpy().copy(), tmodel.fc1.bias.detach().numpy().copy()
    xs, cs = _data(5)
    half = STEPS // 2
    prec, v, step = _jax_setup(policy, w, b)
    if direction == "torch->jax":
        _torch_run(tmodel, xs[:half], cs[:half])
        v = jfp8.load_state_tensors(v, _np(tfp8.state_tensors(tmodel)), prec.policy)
    else:
        v, _ = _jax_run(prec, v, step, xs[:half], cs[:half])
        tfp8.load_state_tensors(tmodel, jfp8.state_tensors(v, prec.policy))
    v, _ = _jax_run(prec, v, step, xs[half:], cs[half:])
    _torch_run(tmodel, xs[half:], cs[half:])
    _assert_states_equal(jfp8.state_tensors(v, prec.policy), _np(tfp8.state_tensors(tmodel)), direction)


def test_fp8_state_crosses_backends_in_the_precision_checkpoint(tmp_path):
    """torch Precision.state_dict -> dualprec.checkpoint file -> JAX Precision.load_state_dict,
    then both continue on the same tensors and their states stay bit-identical."""
    import optax

    from dualprec import checkpoint
    from dualprec_torch import Precision as TorchPrecision

    policy = POLICIES["hybrid"]
    torch.manual_seed(0)
    tmodel = torch.nn.Sequential()
    tmodel.add_module("fc1", torch.nn.Linear(IN, OUT))
    tprec = TorchPrecision(policy)
    opt = torch.optim.SGD(tmodel.parameters(), lr=0.0)  # weights fixed: the state alone evolves
    tmodel, opt = tprec.setup(tmodel, opt)
    assert isinstance(tmodel.fc1, tfp8.FP8Linear)
    w, b = tmodel.fc1.weight.detach().numpy().copy(), tmodel.fc1.bias.detach().numpy().copy()
    xs, cs = _data(6)
    half = 4
    _torch_run(tmodel, xs[:half], cs[:half])
    path = tmp_path / "precision.safetensors"
    checkpoint.save_state(path, tprec.state_dict())

    prec, v, step = _jax_setup(policy, w, b)
    opt_state = prec.wrap_optimizer(optax.sgd(0.0)).init(v["params"])
    _, v = prec.load_state_dict(checkpoint.load_state(path), opt_state, v)
    v, _ = _jax_run(prec, v, step, xs[half:], cs[half:])
    _torch_run(tmodel, xs[half:], cs[half:])
    _assert_states_equal(jfp8.state_tensors(v), _np(tfp8.state_tensors(tmodel)), "after resume")



class _Reused(nn.Module):
    @nn.compact
    def __call__(self, x1, x2):
        dense = nn.Dense(OUT, name="fc1")  # one layer, two calls per step
        return dense(x1), dense(x2)


def _ref_state(state, amaxes, recipe):
    for role in ref.ROLES:
        state = ref.fp8_delayed_update(state, role, amaxes[role], recipe)
    return {f"fp8.fc1.{r}.{f}": getattr(state[r], "scale" if f == "scale" else "amax_history")
            for r in ref.ROLES for f in ("scale", "amax_history")}, state


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_layer_called_twice_per_step_agrees_across_backends(name):
    """One layer called on two inputs before one backward: both backends quantize both calls
    with the step's scales, record the max of the two amaxes per role and roll once."""
    policy = POLICIES[name]
    recipe = Policy.parse(policy).fp8
    torch.manual_seed(0)
    tmodel = _TorchModel(recipe).train()
    w, b = tmodel.fc1.weight.detach().numpy().copy(), tmodel.fc1.bias.detach().numpy().copy()
    (xs1, cs1), (xs2, cs2) = _data(7), _data(8)
    xs2[5] = np.zeros_like(xs2[5])  # one call's amax 0, the other's not
    cs2[6] = np.nan_to_num(cs2[6])  # a NaN output gradient in one call only
    steps = 7

    prec, model = Precision(policy), _Reused()
    v = prec.init(model, jax.random.PRNGKey(0), xs1[0], xs2[0])
    v = {**v, "params": {"fc1": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}}}

    @jax.jit
    def step(v, x1, x2, c1, c2):
        _, vjp = jax.vjp(lambda v: prec.apply(model, v, x1, x2), v)
        return vjp((c1, c2))[0]

    state = ref.fp8_delayed_init(recipe)
    for t in range(steps):
        v = jfp8.apply_fp8_grads(v, step(v, *(jnp.asarray(a[t]) for a in (xs1, xs2, cs1, cs2))))
        x1, x2 = (torch.tensor(a[t], requires_grad=True) for a in (xs1, xs2))
        y1, y2 = tmodel.fc1(x1), tmodel.fc1(x2)
        ((y1 * torch.tensor(cs1[t])).sum() + (y2 * torch.tensor(cs2[t])).sum()).backward()
        amaxes = {"input": np.maximum(ref.amax(xs1[t]), ref.amax(xs2[t])), "weight": ref.amax(w),
                  "grad_output": np.maximum(ref.amax(cs1[t]), ref.amax(cs2[t]))}
        want, state = _ref_state(state, amaxes, recipe)
        got_jax, got_torch = jfp8.state_tensors(v, prec.policy), _np(tfp8.state_tensors(tmodel))
        _assert_states_equal(got_jax, got_torch, f"step {t} jax vs torch")
        _assert_states_equal(got_jax, want, f"step {t} jax vs ref")


def test_gradient_accumulation_steps_the_recipe_per_micro_batch_in_both_backends():
    """Two micro-batches per optimizer step, each with its own backward (torch: .grad
    accumulates; JAX: a gradient evaluation each, the FP8 state applied after each, as
    TrainState.apply_gradients under optax.MultiSteps does): one recipe step per micro-batch."""
    policy = POLICIES["hybrid"]
    torch.manual_seed(0)
    tmodel = _TorchModel(Policy.parse(policy).fp8).train()
    w, b = tmodel.fc1.weight.detach().numpy().copy(), tmodel.fc1.bias.detach().numpy().copy()
    xs, cs = _data(9)
    prec, v, step = _jax_setup(policy, w, b)
    for t in range(0, 6, 2):
        jax_grad = 0
        for micro in (t, t + 1):
            _, _, gv = step(v, jnp.asarray(xs[micro]), jnp.asarray(cs[micro]))
            v = jfp8.apply_fp8_grads(v, gv)
            jax_grad = jax_grad + np.asarray(gv["params"]["fc1"]["kernel"])
            tmodel.fc1(torch.tensor(xs[micro], requires_grad=True)).backward(torch.tensor(cs[micro]))
            _assert_states_equal(jfp8.state_tensors(v, prec.policy), _np(tfp8.state_tensors(tmodel)),
                                 f"micro-batch {micro}")
        tgw = tmodel.fc1.weight.grad.numpy().T
        np.testing.assert_allclose(jax_grad, tgw, rtol=1e-5, atol=1e-5 * np.abs(tgw).max())
        tmodel.fc1.weight.grad = tmodel.fc1.bias.grad = None
