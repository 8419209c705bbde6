"""The native JAX FP8 engine against dualprec.ref.fp8: scales and amax histories bit for bit
over many steps (an amax of 0 and non-finite amaxes among them), fp8 codes equal, GEMM
outputs within tolerance of the reference's quantize-dequantized product; linen and nnx
layers through Precision; state save/load and its refusals."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dualprec.policy import FP8Recipe
from dualprec.ref import fp8 as ref
from dualprec.ref.casts import nan_equal
from dualprec_jax import Precision, fp8

DIMS = (((1,), (0,)), ((), ()))
BF16 = ml_dtypes.bfloat16


def _inputs(steps, shape, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 30) for _ in range(steps)]


def _run_jax(xs, ws, gs, recipe):
    """Step through fp8_dot_general with the state overwritten by its gradient each step."""
    meta = fp8.init_meta(recipe)
    out = []
    for x, w, g in zip(xs, ws, gs):
        y, vjp = jax.vjp(lambda a, b, m: fp8.fp8_dot_general(a, b, DIMS, m, recipe), x, w, meta)
        dx, dw, meta = vjp(jnp.asarray(g))
        out.append((np.asarray(y), np.asarray(dx), np.asarray(dw), fp8.state_tensors({"l": meta}, recipe)))
    return out


def _run_ref(xs, ws, gs, recipe):
    state = ref.fp8_delayed_init(recipe)
    out = []
    for x, w, g in zip(xs, ws, gs):
        xq, wq, gq, state = ref.fp8_gemm_qdq(x, w, state, recipe, grad_output=g)
        out.append((xq @ wq, gq @ wq.T, xq.T @ gq, state))
    return out


RECIPES = [FP8Recipe(history_len=4), FP8Recipe(history_len=3, margin=2, amax_algo="most_recent"),
           FP8Recipe(history_len=5, format="e4m3")]


@pytest.mark.parametrize("recipe", RECIPES, ids=["hybrid-max", "most_recent-margin2", "e4m3"])
def test_delayed_state_bit_identical_to_ref(recipe):
    steps = 10
    xs, ws, gs = _inputs(steps, (8, 16), 0), _inputs(steps, (16, 4), 1), _inputs(steps, (8, 4), 2)
    xs[3] = np.zeros_like(xs[3])       # amax 0: the previous scale is kept
    gs[5] = gs[5].copy()
    gs[5][0, 0] = np.inf   # non-finite amaxes
    gs[7] = gs[7].copy()
    gs[7][1, 2] = np.nan
    ws[6] = ws[6] * 1e4                  # saturating cast
    got, want = _run_jax(xs, ws, gs, recipe), _run_ref(xs, ws, gs, recipe)
    for step, ((y, dx, dw, st), (ry, rdx, rdw, rstate)) in enumerate(zip(got, want)):
        for role in ref.ROLES:
            scale, hist = st[f"fp8.l.{role}.scale"], st[f"fp8.l.{role}.amax_history"]
            assert nan_equal(scale, np.float32(rstate[role].scale)), (step, role, scale, rstate[role].scale)
            assert nan_equal(hist, rstate[role].amax_history), (step, role, hist, rstate[role].amax_history)
        np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5 * np.abs(ry).max())
        if step not in (5, 7):  # non-finite output gradients: NaN/inf products either way
            np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5 * np.abs(rdx).max())
            np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5 * np.abs(rdw).max())


def test_codes_equal_ref_including_saturation():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 128)) * 50).astype(np.float32)
    x[0, :4] = [1e6, -1e6, np.inf, -np.inf]
    for fmt in (ref.E4M3, ref.E5M2):
        for scale in (np.float32(1.0), np.float32(7.3), ref.fp8_current_scale(x[1:], fmt)):
            q = np.asarray(fp8.quantize(jnp.asarray(x), jnp.float32(scale), fmt))
            assert nan_equal(q, ref.quantize_fp8(x, scale, fmt)), (fmt, scale)
        # bf16 operands quantize the same as their float32 values
        xb = x.astype(BF16)
        q = np.asarray(fp8.quantize(jnp.asarray(xb), jnp.float32(3.0), fmt))
        assert nan_equal(q, ref.quantize_fp8(xb.astype(np.float32), np.float32(3.0), fmt))


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_current_scaling_matches_ref(fmt):
    recipe = FP8Recipe(scaling="current", format=fmt)
    rng = np.random.default_rng(4)
    x, w, g = (rng.standard_normal(s).astype(np.float32) * 9 for s in ((8, 16), (16, 4), (8, 4)))
    for xi in (x, np.zeros_like(x)):
        y, vjp = jax.vjp(lambda a, b: fp8.fp8_dot_general(a, b, DIMS, recipe=recipe), xi, w)
        dx, dw = vjp(jnp.asarray(g))
        rx, rw, rg, _ = ref.fp8_gemm_qdq(xi, w, None, recipe, grad_output=g)
        for got, want in ((y, rx @ rw), (dx, rg @ rw.T), (dw, rx.T @ rg)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 + 1e-5 * np.abs(want).max())
    # the stateless dot_general a user passes to nn.Dense
    dg = fp8.current_dot_general(recipe)
    np.testing.assert_array_equal(np.asarray(dg(x, w, DIMS)),
                                  np.asarray(fp8.fp8_dot_general(x, w, DIMS, recipe=recipe)))


def test_reused_layer_records_max_amax_and_rolls_once():
    recipe = FP8Recipe(history_len=4)
    meta = fp8.init_meta(recipe)
    w = jnp.ones((4, 3))
    x1, x2 = jnp.full((2, 4), 2.0), jnp.full((2, 4), 5.0)

    def loss(m):
        m = fp8.max_accumulating({fp8.FP8_COLLECTION: {"l": m}})[fp8.FP8_COLLECTION]["l"]
        return (fp8.fp8_dot_general(x1, w, DIMS, m, recipe).sum() * 3.0
                + fp8.fp8_dot_general(x2, w, DIMS, m, recipe).sum())

    new = jax.jit(jax.grad(loss))(meta)
    assert new["input_amax_history"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(new["input_amax_history"]), [5.0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(new["grad_output_amax_history"]), [3.0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(new["weight_amax_history"]), [1.0, 0, 0, 0])


class _OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc1")(x)


class _NnxOne(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc1(x)


POLICY = "params=float32,compute=bfloat16,output=float32,fp8=delayed(history_len=3)"


def _ref_layer_run(x, w, b, cs, recipe, from_params=False):
    """The reference run of one Dense under bf16 compute (docs/fp8.md's rule): operands as the
    layer received them (``from_params``: the float32 input and parameter, the linen rule) or
    their bf16 copies (nnx), quantized with this step's scales; the FP8 GEMM accumulated in
    float32 and scaled by ``1/s_x * 1/s_w``; the bias added in float32; one rounding to bf16;
    the bf16 output gradient.  Returns ``(outputs, decided, state)``: ``decided`` marks the
    outputs whose bf16 rounding no float32 summation order of the K products can change."""
    state = ref.fp8_delayed_init(recipe)
    xb = x if from_params else x.astype(BF16).astype(np.float32)
    wb = w if from_params else w.astype(BF16).astype(np.float32)
    bb = b.astype(BF16).astype(np.float32)
    k = x.shape[-1]
    ys, decided = [], []
    for c in cs:
        sx, sw = (np.float32(state[r].scale) for r in ("input", "weight"))
        qx = ref.quantize_fp8(xb, sx, ref.role_format("input", recipe)).astype(np.float64)
        qw = ref.quantize_fp8(wb, sw, ref.role_format("weight", recipe)).astype(np.float64)
        inv = np.float32(np.float32(1) / sx) * np.float32(np.float32(1) / sw)
        exact = qx @ qw  # products of FP8 values: exact; the float32 sum rounds
        err = k * 2.0 ** -24 * (np.abs(qx) @ np.abs(qw))  # any order (Higham's gamma_K)

        def out(acc):
            return ((acc.astype(np.float32) * inv).astype(np.float32) + bb).astype(BF16).astype(np.float32)

        ys.append(out(exact))
        decided.append(out(exact - err) == out(exact + err))
        g = c.astype(BF16).astype(np.float32)  # the layer's output is rounded to bf16
        _, _, _, state = ref.fp8_gemm_qdq(xb, wb, state, recipe, grad_output=g)
    return ys, decided, state


def test_linen_dense_through_precision_matches_ref():
    prec = Precision(POLICY)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    cs = [rng.standard_normal((8, 4)).astype(np.float32) * s for s in (1, 100, 0.01, 3, 7)]
    model = _OneDense()
    v = prec.init(model, jax.random.PRNGKey(0), x)
    assert set(v) == {"params", fp8.FP8_COLLECTION}
    w, b = (np.asarray(v["params"]["fc1"][k]) for k in ("kernel", "bias"))

    @jax.jit
    def step(v, c):
        y, vjp = jax.vjp(lambda v: prec.apply(model, v, x), v)
        return y, vjp(c)[0]

    ys = []
    for c in cs:  # params fixed: the state alone evolves
        y, g = step(v, jnp.asarray(c))
        ys.append(np.asarray(y))
        v = fp8.apply_fp8_grads(v, g)
    want_ys, decided, state = _ref_layer_run(x, w, b, cs, prec.policy.fp8, from_params=True)
    st = fp8.state_tensors(v, prec.policy)
    assert sorted(st) == sorted(f"fp8.fc1.{r}.{f}" for r in ref.ROLES for f in ("scale", "amax_history"))
    for role in ref.ROLES:
        assert nan_equal(st[f"fp8.fc1.{role}.scale"], np.float32(state[role].scale)), role
        assert nan_equal(st[f"fp8.fc1.{role}.amax_history"], state[role].amax_history), role
    # Bit-equal wherever the arithmetic decides the output (here: every element); an output
    # rounded to bf16 before the bias (the FP8 GEMM under the op table's matmul rule) fails.
    for y, wy, ok in zip(ys, want_ys, decided):
        assert y.dtype == np.float32
        assert ok.mean() > 0.9, ok.mean()
        np.testing.assert_array_equal(y[ok], wy[ok])
        assert np.all(np.abs(y - wy) <= np.abs(wy) * 2.0 ** -7)


def test_nnx_linear_through_precision_matches_ref():
    prec = Precision(POLICY)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    cs = [rng.standard_normal((8, 4)).astype(np.float32) * s for s in (1, 50, 2)]
    model = prec.setup(_NnxOne(nnx.Rngs(0)))
    w, b = np.asarray(model.fc1.kernel[...]), np.asarray(model.fc1.bias[...])

    @nnx.jit
    def step(model, c):
        def f(model):
            return jnp.sum(model(x).astype(jnp.float32) * c)
        return nnx.grad(f, argnums=nnx.DiffState(0, fp8.Fp8Meta))(model)

    for c in cs:
        grads = step(model, jnp.asarray(c))
        fp8.nnx_apply_fp8_grads(model, grads)
    assert isinstance(model.fc1, fp8.Fp8NnxLinear)
    # quantized from the float32 parameter and input, as linen (not their bf16 copies)
    _, _, state = _ref_layer_run(x, w, b, cs, prec.policy.fp8, from_params=True)
    st = fp8.state_tensors(model, prec.policy)
    for role in ref.ROLES:
        assert nan_equal(st[f"fp8.fc1.{role}.scale"], np.float32(state[role].scale)), role
        assert nan_equal(st[f"fp8.fc1.{role}.amax_history"], state[role].amax_history), role


def test_state_round_trip_resumes_bit_identically():
    prec = Precision(POLICY)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    model = _OneDense()
    v0 = prec.init(model, jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda v, c: jnp.sum(prec.apply(model, v, x) * c)))
    cs = [jnp.asarray(rng.standard_normal((8, 4)).astype(np.float32) * s) for s in (1, 9, 0.1, 4)]
    v = v0
    for c in cs[:2]:
        v = fp8.apply_fp8_grads(v, grad(v, c))
    saved = fp8.state_tensors(v, prec.policy)
    resumed = fp8.load_state_tensors(prec.init(model, jax.random.PRNGKey(0), x), saved, prec.policy)
    assert nan_equal(fp8.state_tensors(resumed, prec.policy)["fp8.fc1.input.scale"], saved["fp8.fc1.input.scale"])
    for c in cs[2:]:
        v = fp8.apply_fp8_grads(v, grad(v, c))
        resumed = fp8.apply_fp8_grads(resumed, grad(resumed, c))
    a, b = fp8.state_tensors(v, prec.policy), fp8.state_tensors(resumed, prec.policy)
    assert a.keys() == b.keys() and all(nan_equal(a[k], b[k]) for k in a)


def test_loading_fp8_state_into_a_non_fp8_run_and_back_is_refused():
    x = np.ones((2, 16), np.float32)
    model = _OneDense()
    fp8_prec, plain = Precision(POLICY), Precision("bf16-mixed")
    v_fp8 = fp8_prec.init(model, jax.random.PRNGKey(0), x)
    v_plain = plain.init(model, jax.random.PRNGKey(0), x)
    state = fp8.state_tensors(v_fp8, fp8_prec.policy)
    with pytest.raises(ValueError, match="no delayed-scaling FP8 layers"):
        fp8.load_state_tensors(v_plain, state)
    with pytest.raises(ValueError, match="holds no FP8 state"):
        fp8.load_state_tensors(v_fp8, {"loss_scale.scale": np.float32(1)}, fp8_prec.policy)
    longer = Precision("params=float32,compute=bfloat16,output=float32,fp8=delayed(history_len=5)")
    with pytest.raises(ValueError, match="history_len"):
        fp8.load_state_tensors(longer.init(model, jax.random.PRNGKey(0), x), state, longer.policy)
    assert fp8.state_tensors(v_plain) == {}


def test_precision_runs_fp8_policies_and_presets():
    # "transformer-engine" needs TE here; its native fallback runs the same recipe
    for s in ("params=float32,compute=bfloat16,output=float32,fp8=current",
              "params=bfloat16,compute=bfloat16,output=float32,fp8=delayed(engine=native)"):
        prec = Precision(s)
        model = _OneDense()
        x = np.ones((2, 16), np.float32)
        v = prec.init(model, jax.random.PRNGKey(0), x)
        y = prec.apply(model, v, x)
        assert y.shape == (2, 4) and np.isfinite(np.asarray(y)).all()
        assert (fp8.FP8_COLLECTION in v) == (prec.policy.fp8.scaling == "delayed")


def test_transformer_engine_presets_without_te_name_the_native_fallback():
    from dualprec import PolicyError
    from dualprec.presets import presets

    names = [n for n, p in presets().items() if p.fp8 and not p.quantization]
    assert "transformer-engine" in names
    for name in names:
        if presets()[name].fp8.engine != "transformer-engine":
            Precision(name)
            continue
        with pytest.raises(PolicyError, match="Transformer Engine") as err:
            Precision(name)
        assert "engine=native" in str(err.value)


def test_fp8_state_in_the_precision_checkpoint(tmp_path):
    import optax

    from dualprec import checkpoint

    prec = Precision(POLICY)
    model = _OneDense()
    x = np.random.default_rng(8).standard_normal((8, 16)).astype(np.float32)
    v = prec.init(model, jax.random.PRNGKey(0), x)
    tx = prec.wrap_optimizer(optax.sgd(1e-2))
    opt_state = tx.init(v["params"])
    grad = jax.jit(jax.grad(lambda v: jnp.sum(prec.apply(model, v, x) ** 2)))
    for _ in range(2):
        v = fp8.apply_fp8_grads(v, grad(v))
    path = tmp_path / "precision.safetensors"
    checkpoint.save_state(path, prec.state_dict(opt_state, v))
    state = checkpoint.load_state(path)
    assert sorted(state["extensions"]["fp8"]) == sorted(fp8.state_tensors(v))
    fresh = prec.init(model, jax.random.PRNGKey(0), x)
    _, restored = prec.load_state_dict(state, opt_state, fresh)
    a, b = fp8.state_tensors(v), fp8.state_tensors(restored)
    assert all(nan_equal(a[k], b[k]) for k in a)
    # an FP8 checkpoint into a run without FP8 layers: refused, not ignored
    plain = Precision("params=float32,compute=bfloat16,output=float32")
    pv = plain.init(model, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="no delayed-scaling FP8 layers"):
        plain.load_state_dict(state, plain.wrap_optimizer(optax.sgd(1e-2)).init(pv["params"]), pv, strict=False)


def test_general_dimension_numbers_match_the_qdq_product():
    """Several contracting axes and a batch axis (the einsum path of the backward)."""
    recipe = FP8Recipe(scaling="current")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 4
    w = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    dims = (((2, 3), (1, 2)), ((0,), (0,)))  # batch 0, contract (4, 5)
    y, vjp = jax.vjp(lambda a, b: fp8.fp8_dot_general(a, b, dims, recipe=recipe), x, w)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = vjp(jnp.asarray(g))
    xq, wq, gq, _ = ref.fp8_gemm_qdq(x, w, None, recipe, grad_output=g)
    want_y, want_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims, precision="highest"), xq, wq)
    want_dx, want_dw = want_vjp(jnp.asarray(gq))
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a DenseGeneral over two axes under an FP8 policy runs the same dot
    prec = Precision(POLICY)
    model = nn.DenseGeneral(features=(2, 3), axis=(-2, -1), name="proj")
    v = prec.init(model, jax.random.PRNGKey(0), x[0])
    state = fp8.state_tensors(v)  # a model that is one layer has no path, as in torch
    assert state["fp8.input.scale"].shape == () and len(state) == 6
    assert fp8.state_tensors(fp8.load_state_tensors(v, state)).keys() == state.keys()
    assert prec.apply(model, v, x[0]).shape == (3, 2, 3)


class _NnxReused(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc1(x) + self.fc1(x * 3.0)


def test_nnx_reused_layer_records_max_and_state_keeps_float32():
    prec = Precision(POLICY)
    model = prec.setup(_NnxReused(nnx.Rngs(0)))
    x = jnp.ones((2, 4))
    nnx.jit(lambda m, x: m(x))(model, x)  # a jitted forward leaves the state's dtype alone
    assert model.fc1.dot_general.input_scale.get_value().dtype == jnp.float32

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)),
                        argnums=nnx.DiffState(0, fp8.Fp8Meta))(model)

    fp8.nnx_apply_fp8_grads(model, grads(model))
    hist = fp8.state_tensors(model)["fp8.fc1.input.amax_history"]
    np.testing.assert_array_equal(hist, [3.0, 0.0, 0.0])  # max(1, 3), one roll
    assert model.fc1.dot_general.input_scale.get_value().dtype == jnp.float32


def test_fp8_dense_inside_precision_autocast_of_a_function():
    prec = Precision(POLICY)
    model = _OneDense()
    x = np.random.default_rng(10).standard_normal((8, 16)).astype(np.float32)
    v = prec.init(model, jax.random.PRNGKey(0), x)
    loss = prec.autocast(lambda v, x: jnp.sum(model.apply(v, x).astype(jnp.float32)))
    g = jax.jit(jax.grad(loss))(v, x)
    state = fp8.state_tensors(fp8.apply_fp8_grads(v, g))
    # the input as the layer received it (float32), not its bf16 copy; the weight: the parameter
    assert state["fp8.fc1.input.amax_history"][0] == np.abs(x).max()
    assert state["fp8.fc1.weight.amax_history"][0] == np.abs(np.asarray(v["params"]["fc1"]["kernel"])).max()
    assert state["fp8.fc1.grad_output.amax_history"][0] == 1.0
