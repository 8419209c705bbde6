"""Block-scaled recipes: reference, torch and JAX give the same scales and codes bit for bit
(forward and the three GEMMs of the backward), and outputs within float32 GEMM bounds."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from dualprec import FP8Recipe  # noqa: E402
from dualprec.ref import blockscale as ref  # noqa: E402
from dualprec_jax import blockscale as jbs  # noqa: E402
from dualprec_torch import blockscale as tbs  # noqa: E402

RECIPES = [FP8Recipe("rowwise"), FP8Recipe("rowwise_with_gw_hp"),
           FP8Recipe("mxfp8"), FP8Recipe("mxfp8", rounding="floor", format="hybrid"),
           FP8Recipe("mxfp8", rounding="even"), FP8Recipe("mxfp8", rounding="ceil"),
           FP8Recipe("nvfp4"), FP8Recipe("nvfp4", sr=False, rht=False, weight_blocks="1x16")]
IDS = [str(r.scaling) + ("" if r.scaling != "mxfp8" else "-" + r.rounding + "-" + r.format)
       + ("" if r.scaling != "nvfp4" else ("-all" if r.sr else "-none")) for r in RECIPES]
RECIPE_PARAMS = [pytest.param(r, marks=pytest.mark.slow) if r.scaling == "nvfp4" else r for r in RECIPES]


def _np(v):
    if isinstance(v, torch.Tensor):
        v = v.detach()
        if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return v.view(torch.uint8).numpy()
        return v.numpy()
    a = np.asarray(v)
    if a.dtype.itemsize == 1 and a.dtype.kind == "V" or str(a.dtype).startswith("float8"):
        return a.view(np.uint8)
    return a


def _ref_parts(x, w, g, recipe, seed, step):
    s = recipe.scaling
    if s.startswith("rowwise"):
        return ref.rowwise_linear(x, w, g, with_gw_hp=s == "rowwise_with_gw_hp")
    if s == "mxfp8":
        return ref.mx_linear(x, w, g, rounding=recipe.rounding,
                             fmt_grad="float8_e5m2" if recipe.format == "hybrid" else "float8_e4m3fn")
    return ref.nvfp4_linear(x, w, g, sr=recipe.sr, rht=recipe.rht, weight_blocks=recipe.weight_blocks,
                            seed=seed, step=step)


def _data(seed, m=37, k=70, n=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * np.float32(3.0)
    x[3, :] = 0.0                      # an all-zero row / block
    x[5, 40:] *= np.float32(1e4)       # a block far larger than the rest
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    g = rng.standard_normal((m, n)).astype(np.float32)
    g[:, 7] = 0.0
    return x, w, g


def _same(a, b):
    a, b = _np(a), _np(b)
    assert a.shape == b.shape
    if a.dtype.kind == "f":
        na = np.isnan(a)
        return np.array_equal(na, np.isnan(b)) and np.array_equal(a[~na].view(np.uint32 if a.itemsize == 4 else np.uint8),
                                                                   b[~na].view(np.uint32 if b.itemsize == 4 else np.uint8))
    return np.array_equal(a.astype(np.int64), b.astype(np.int64))


@pytest.mark.parametrize("recipe", RECIPE_PARAMS, ids=IDS)
def test_scales_and_codes_bit_identical_torch_jax_reference(recipe):
    x, w, g = _data(0)
    seed, step = 1234, 5
    r = _ref_parts(x, w, g, recipe, seed, step)
    t = tbs.block_linear_parts(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g), recipe, seed, step)
    j = jbs.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), recipe, seed, step)
    keys = [k for k in r if k not in ("y", "dx", "dw")]
    assert keys and set(keys) == {k for k in t if k not in ("y", "dx", "dw")} == \
        {k for k in j if k not in ("y", "dx", "dw")}
    for k in keys:
        assert _same(r[k], t[k]), f"torch {k}"
        assert _same(r[k], j[k]), f"jax {k}"
    for k in ("y", "dx", "dw"):  # float32 GEMMs in different orders: within the summation bound
        bound = 1e-5 * float(np.max(np.abs(r[k])))
        np.testing.assert_allclose(_np(t[k]), r[k], rtol=0, atol=bound, err_msg=f"torch {k}")
        np.testing.assert_allclose(np.asarray(j[k]), r[k], rtol=0, atol=bound, err_msg=f"jax {k}")


def test_sr_bits_depend_on_seed_and_step_only():
    recipe = FP8Recipe("nvfp4")
    x, w, g = _data(1)
    a = ref.nvfp4_linear(x, w, g, seed=7, step=0)
    b = ref.nvfp4_linear(x, w, g, seed=7, step=1)
    c = ref.nvfp4_linear(x, w, g, seed=8, step=0)
    assert not np.array_equal(a["g_q"], b["g_q"]) and not np.array_equal(a["g_q"], c["g_q"])
    assert np.array_equal(a["x_q"], b["x_q"])  # the forward operands do not round stochastically
    t = tbs.block_linear_parts(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g), recipe, 7, 1)
    assert _same(b["g_q"], t["g_q"]) and _same(b["gt_q"], t["gt_q"])


@pytest.mark.slow  # JAX compiles each recipe's three GEMMs twice (about 8-18 s each under load)
@pytest.mark.parametrize("recipe", [RECIPES[0], RECIPES[2], RECIPES[6]], ids=["rowwise", "mxfp8", "nvfp4"])
def test_autograd_layers_match_parts_and_advance_state(recipe):
    x, w, g = _data(2, m=20, k=48, n=16)
    lin = tbs.BlockScaledLinear(48, 16, bias=False, recipe=recipe, seed=99)
    lin.weight.data = torch.from_numpy(w.copy())
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    for step in range(2):
        xt.grad = None
        lin.weight.grad = None
        y = lin(xt)
        y.backward(torch.from_numpy(g))
        parts = tbs.block_linear_parts(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g), recipe, 99, step)
        assert torch.equal(y.detach(), parts["y"])
        assert torch.equal(xt.grad, parts["dx"]) and torch.equal(lin.weight.grad, parts["dw"])
        assert lin.blockscale_state.tolist() == [99, step + 1]
        # JAX: the same function through jax.vjp
        y_j, vjp = jax.vjp(lambda a, b: jbs.block_linear(a, b, recipe, 99, step), jnp.asarray(x), jnp.asarray(w))
        dx_j, dw_j = vjp(jnp.asarray(g))
        jp = jbs.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), recipe, 99, step)
        assert np.array_equal(np.asarray(y_j), np.asarray(jp["y"]))
        assert np.array_equal(np.asarray(dx_j), np.asarray(jp["dx"]))
        assert np.array_equal(np.asarray(dw_j), np.asarray(jp["dw"]))
        bound = 1e-5 * float(torch.max(torch.abs(parts["dw"])))
        np.testing.assert_allclose(np.asarray(dw_j), parts["dw"].numpy(), rtol=0, atol=bound)
    # the state is in the state dict: a resumed layer continues with the same bits
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    other = tbs.BlockScaledLinear(48, 16, bias=False, recipe=recipe, seed=0)
    other.load_state_dict(sd)
    assert other.blockscale_state.tolist() == [99, 2]


def test_layer_refuses_per_tensor_recipes():
    with pytest.raises(TypeError, match="block-scaled"):
        tbs.BlockScaledLinear(4, 4, recipe=FP8Recipe("current"))
    with pytest.raises(TypeError, match="block-scaled"):
        jbs.block_linear(jnp.zeros((2, 4)), jnp.zeros((4, 4)), FP8Recipe("delayed"))


@pytest.mark.parametrize("rounding", ["rceil", "floor", "ceil", "even"])
def test_mx_specials_torch_jax_reference(rounding):
    # zeros, huge, inf and NaN blocks, a last dimension that is not a multiple of 32
    # (no subnormals: XLA:CPU flushes them)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 70)).astype(np.float32)
    x[0, :32] = 0.0
    x[1, 32:64] *= np.float32(1e37)
    x[2, 5] = np.inf
    x[3, 40] = np.nan
    for fmt in ("float8_e4m3fn", "float8_e5m2"):
        rs, rq = ref.mx_quantize(x, rounding, fmt)
        ts, tq = tbs.mx_quantize(torch.from_numpy(x), rounding, fmt)
        js, jq = jbs.mx_quantize(jnp.asarray(x), rounding, fmt)
        assert np.array_equal(rs.view(np.uint8), ts.numpy()) and np.array_equal(rs.view(np.uint8), np.asarray(js))
        assert _same(rq, tq) or _nan_codes_only(rq, _np(tq), fmt)
        assert _same(rq, np.asarray(jq)) or _nan_codes_only(rq, _np(np.asarray(jq)), fmt)


def _nan_codes_only(a, b, fmt):
    fa = a.astype(np.float32)
    fb = np.asarray(b).view(ref._DT[fmt]).astype(np.float32)
    nan = np.isnan(fa)
    return np.array_equal(nan, np.isnan(fb)) and np.array_equal(fa[~nan], fb[~nan])


def test_torch_precision_run_resumes_bit_identically_and_state_feeds_jax():
    from dualprec_torch import Precision

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))
        p = Precision("32-true,fp8=nvfp4")
        return (p, *p.setup(m, torch.optim.SGD(m.parameters(), lr=0.1)))

    rng = np.random.default_rng(4)
    batches = [(torch.from_numpy(rng.standard_normal((16, 32)).astype(np.float32)),
                torch.from_numpy(rng.standard_normal((16, 8)).astype(np.float32))) for _ in range(4)]

    def step(p, m, opt, xy):
        loss = torch.nn.functional.mse_loss(m(xy[0]), xy[1])
        p.backward(loss)
        p.step(opt)
        opt.zero_grad()

    p, m, opt = make()
    for xy in batches:
        step(p, m, opt, xy)
    p2, m2, opt2 = make()
    for xy in batches[:2]:
        step(p2, m2, opt2, xy)
    saved = {k: v.clone() for k, v in m2.state_dict().items()}
    p3, m3, opt3 = make()
    m3.load_state_dict(saved)
    assert m3[0].blockscale_state.tolist()[1] == 2
    for xy in batches[2:]:
        step(p3, m3, opt3, xy)
    for a, b in zip(m.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b)
    # the saved [seed, step] is what the JAX dot takes: its SR codes for the next step match torch's
    seed, st = saved["0.blockscale_state"].tolist()
    x = batches[2][0].numpy()
    w = saved["0.weight"].numpy()
    g = np.random.default_rng(5).standard_normal((16, 48)).astype(np.float32)
    t = tbs.block_linear_parts(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g), m3[0].recipe, seed, st)
    j = jbs.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), m3[0].recipe, seed, st)
    assert _same(t["g_q"], j["g_q"]) and _same(t["gt_q"], j["gt_q"])


# ----------------------------------------------------------------------------- mutants
def _mismatches(parts, recipe, x, w, g, seed, step):
    r = _ref_parts(x, w, g, recipe, seed, step)
    return [k for k in r if k not in ("y", "dx", "dw") and not _same(r[k], parts[k])]


def test_mutants_are_caught_by_the_bit_identity_check(monkeypatch):
    x, w, g = _data(6)
    t = lambda recipe, seed=3, step=2: tbs.block_linear_parts(  # noqa: E731
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g), recipe, seed, step)
    mx = FP8Recipe("mxfp8")
    assert _mismatches(t(mx), mx, x, w, g, 3, 2) == []
    # 1. wrong scale rounding mode (floor where the recipe says rceil)
    real = tbs.mx_quantize
    monkeypatch.setattr(tbs, "mx_quantize", lambda v, rounding="rceil", *a, **k: real(v, "floor", *a, **k))
    assert "x_s" in _mismatches(t(mx), mx, x, w, g, 3, 2)
    monkeypatch.setattr(tbs, "mx_quantize", real)
    # 2. block axis swapped: the grad_input GEMM's weight blocked along K instead of N
    orig_parts = tbs.block_linear_parts

    def swapped(xx, ww, gg, recipe, seed=0, step=0, **kw):
        out = orig_parts(xx, ww, gg, recipe, seed, step, **kw)
        out["wt_s"], out["wt_q"] = real(ww, recipe.rounding)
        return out

    got = swapped(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g), mx, 3, 2)
    with pytest.raises(AssertionError):
        assert _mismatches(got, mx, x, w, g, 3, 2) == []
    # 3. scale one step late / 4. SR seed not restored (a resumed run starting over at step 0
    # or drawing with another seed): the gradient codes differ
    nv = FP8Recipe("nvfp4")
    assert _mismatches(t(nv), nv, x, w, g, 3, 2) == []
    assert {"g_q", "gt_q"} <= set(_mismatches(t(nv, step=1), nv, x, w, g, 3, 2))
    assert {"g_q", "gt_q"} <= set(_mismatches(t(nv, step=0), nv, x, w, g, 3, 2))
    assert {"g_q", "gt_q", "xt_q"} <= set(_mismatches(t(nv, seed=4), nv, x, w, g, 3, 2))  # signs too
    # a row-wise scale not rounded to a power of two
    rw = FP8Recipe("rowwise")
    real_rs = tbs.rowwise_scale
    monkeypatch.setattr(tbs, "floor_pow2", lambda s: s)
    assert "x_s" in _mismatches(t(rw), rw, x, w, g, 3, 2)
    monkeypatch.setattr(tbs, "rowwise_scale", real_rs)


@pytest.mark.slow  # compiles the JAX step
def _jax_one_dense(policy, x, w, b):
    """A Flax model of one Dense named "0" (torch's Sequential index) under ``policy``, holding
    the torch layer's weight ``w`` [out, in] and bias ``b``: (Precision, model, variables)."""
    import flax.linen as nn

    from dualprec_jax import Precision as JPrecision

    class Net(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.Dense(w.shape[0], name="0")(v)

    jp = JPrecision(policy)
    model = Net()
    v = jp.init(model, jax.random.PRNGKey(0), x)
    return jp, model, {**v, "params": {"0": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}}}


def test_precision_layers_both_backends_state_crosses():

    from dualprec_jax import fp8 as jfp8
    from dualprec_torch import Precision as TPrecision
    from dualprec_torch import fp8 as tfp8

    policy = "32-true,fp8=nvfp4"
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    w = (rng.standard_normal((8, 32)) * 0.2).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    cs = [rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3)]

    m = torch.nn.Sequential(torch.nn.Linear(32, 8))
    m[0].weight.data, m[0].bias.data = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
    tp = TPrecision(policy)
    m, opt = tp.setup(m, torch.optim.SGD(m.parameters(), lr=0.0))
    t_dw = []
    for c in cs:
        tp.backward((m(torch.from_numpy(x)) * torch.from_numpy(c)).sum())
        t_dw.append(m[0].weight.grad.numpy().copy())
        tp.step(opt)
        opt.zero_grad()
    t_state = {k: v.numpy() for k, v in tfp8.state_tensors(m).items()}
    assert sorted(t_state) == ["fp8.0.blockscale.state"]
    assert np.array_equal(t_state["fp8.0.blockscale.state"], [tbs.layer_seed("0"), 3])

    jp, model, v = _jax_one_dense(policy, x, w, b)

    @jax.jit
    def grads(v, c):
        return jax.grad(lambda v: jnp.sum(jp.apply(model, v, x) * c))(v)

    for c, dw in zip(cs, t_dw):
        g = grads(v, jnp.asarray(c))
        bound = 1e-5 * float(np.max(np.abs(dw)))
        np.testing.assert_allclose(np.asarray(g["params"]["0"]["kernel"]).T, dw, rtol=0, atol=bound)
        v = jfp8.apply_fp8_grads(v, g)
    j_state = jfp8.state_tensors(v)
    assert sorted(j_state) == sorted(t_state)
    assert np.array_equal(j_state["fp8.0.blockscale.state"], t_state["fp8.0.blockscale.state"])
    # the torch state resumes the JAX run (and vice versa) under the same names
    v2 = jfp8.load_state_tensors(v, {"fp8.0.blockscale.state": np.array([123456789, 7])})
    assert np.array_equal(jfp8.state_tensors(v2)["fp8.0.blockscale.state"], [123456789, 7])
    tfp8.load_state_tensors(m, j_state)
    assert m[0].blockscale_state.tolist() == [tbs.layer_seed("0"), 3]


# ----------------------------------------------------------------------------- resume mid-run
def _resume_run(recipe, tmp_path):
    """(uninterrupted model, resumed model, their optimizers) of the run described below."""
    from dualprec_torch import Precision

    policy = f"32-true,nonfinite=skip,fp8={recipe}"

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))
        p = Precision(policy)
        return (p, *p.setup(m, torch.optim.Adam(m.parameters(), lr=1e-2)))

    rng = np.random.default_rng(4)
    batches = [(torch.from_numpy(rng.standard_normal((32, 32)).astype(np.float32)),
                torch.from_numpy(rng.standard_normal((32, 8)).astype(np.float32))) for _ in range(4)]
    batches[1][1][5, 2] = float("inf")  # a non-finite loss and gradient at step 1

    def step(p, m, opt, xy):
        loss = torch.nn.functional.mse_loss(m(xy[0]), xy[1])
        p.backward(loss)
        took = p.step(opt)
        opt.zero_grad()
        return took

    p, m, opt = make()
    took = [step(p, m, opt, xy) for xy in batches]
    assert [bool(t) for t in took] == [True, False, True, True]
    p2, m2, opt2 = make()
    for xy in batches[:2]:
        step(p2, m2, opt2, xy)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": m2.state_dict(), "opt": opt2.state_dict(), "prec": p2.state_dict()}, path)
    saved = torch.load(path)
    assert all(torch.isfinite(v).all() for k, v in saved["model"].items() if v.is_floating_point())
    assert saved["model"]["0.blockscale_state"].tolist() == [tbs.layer_seed("0"), 1]
    p3, m3, opt3 = make()
    m3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    p3.load_state_dict(saved["prec"])
    for xy in batches[2:]:
        step(p3, m3, opt3, xy)
    return m, m3, opt, opt3


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp", "mxfp8(rounding=floor)", "nvfp4"])
def test_every_recipe_resumes_after_a_nonfinite_step(recipe, tmp_path):
    """4 steps in one go vs 2 steps, a save to disk, a fresh process state, 2 more steps: the
    parameters, the optimizer and the [seed, step] state are bit-identical.  Step 1's gradient
    holds an inf (the step is skipped under nonfinite=skip) and the save comes right after it
    (TE's "NaN FP8 weights in async checkpoints"): the saved weights are finite, the skipped
    step restored the state its iteration began with (docs/fp8.md: [seed, 1] after two
    backwards) and the resumed run continues from it."""
    m, m3, opt, opt3 = _resume_run(recipe, tmp_path)
    for (k, a), b in zip(m.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(opt.state_dict()["state"].values(), opt3.state_dict()["state"].values()):
        assert all(torch.equal(a[f], b[f]) for f in a)


def test_seed_not_restored_after_load_is_caught(tmp_path, monkeypatch):
    """The mutant "SR seed/step not restored after a checkpoint load": a BlockScaledLinear whose
    load keeps its fresh [seed, 0] state (the model state dict's and the precision checkpoint's
    `fp8` extension both ignored).  The NVFP4 resumed run then redraws step 0's SR bits and
    leaves the uninterrupted run's weights."""
    import dataclasses

    from dualprec import checkpoint

    orig = tbs.BlockScaledLinear._load_from_state_dict
    ext = checkpoint._EXTENSIONS[("torch", "fp8")]
    skip_block = dataclasses.replace(ext, load_state_tensors=lambda model, t, **k: ext.load_state_tensors(
        model, {n: v for n, v in t.items() if not n.endswith(".blockscale.state")}, **{**k, "strict": False}))
    monkeypatch.setitem(checkpoint._EXTENSIONS, ("torch", "fp8"), skip_block)

    def load(self, state_dict, prefix, *a, **k):
        fresh = self.blockscale_state.clone()
        orig(self, state_dict, prefix, *a, **k)
        self.blockscale_state.copy_(fresh)

    monkeypatch.setattr(tbs.BlockScaledLinear, "_load_from_state_dict", load)
    m, m3, _, _ = _resume_run("nvfp4", tmp_path)
    assert m3[0].blockscale_state.tolist()[1] == 2 != m[0].blockscale_state.tolist()[1]
    assert not torch.equal(m[0].weight, m3[0].weight)


@pytest.mark.slow  # compiles the JAX step per recipe
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp", "mxfp8", "nvfp4"])
def test_torch_checkpoint_mid_run_resumes_in_jax(recipe):
    """Two torch steps, a checkpoint (weights and `fp8.state_tensors`), then the third step in
    torch and, from the checkpoint, in JAX: the weight gradients agree within 1e-5 of their
    largest entry (an SR draw at another step or seed moves elements by an E2M1 code step,
    up to half of them) and both states end at [seed, 3]."""

    from dualprec_jax import fp8 as jfp8
    from dualprec_torch import Precision as TPrecision
    from dualprec_torch import fp8 as tfp8

    policy = f"32-true,fp8={recipe}"
    rng = np.random.default_rng(9)
    x = rng.standard_normal((32, 32)).astype(np.float32)
    cs = [rng.standard_normal((32, 8)).astype(np.float32) for _ in range(3)]
    m = torch.nn.Sequential(torch.nn.Linear(32, 8))
    tp = TPrecision(policy)
    m, opt = tp.setup(m, torch.optim.SGD(m.parameters(), lr=0.1))

    def t_step(c):
        tp.backward((m(torch.from_numpy(x)) * torch.from_numpy(c)).sum())
        dw = m[0].weight.grad.numpy().copy()
        tp.step(opt)
        opt.zero_grad()
        return dw

    for c in cs[:2]:
        t_step(c)
    w, b = m[0].weight.detach().numpy().copy(), m[0].bias.detach().numpy().copy()
    state = {k: v.numpy().copy() for k, v in tfp8.state_tensors(m).items()}
    assert state["fp8.0.blockscale.state"].tolist() == [tbs.layer_seed("0"), 2]
    t_dw = t_step(cs[2])

    jp, model, v = _jax_one_dense(policy, x, w, b)
    v = jfp8.load_state_tensors(v, state)
    g = jax.jit(jax.grad(lambda v, c: jnp.sum(jp.apply(model, v, x) * c)))(v, jnp.asarray(cs[2]))
    j_dw = np.asarray(g["params"]["0"]["kernel"]).T
    np.testing.assert_allclose(j_dw, t_dw, rtol=0, atol=1e-5 * float(np.max(np.abs(t_dw))))
    v = jfp8.apply_fp8_grads(v, g)
    assert jfp8.state_tensors(v)["fp8.0.blockscale.state"].tolist() == [tbs.layer_seed("0"), 3]
    assert m[0].blockscale_state.tolist() == [tbs.layer_seed("0"), 3]


# ------------------------------------------------------- resume across frameworks, via the file
RESUME_STEPS, RESUME_SPLIT, RESUME_LR = 4, 2, 0.1
RESUME_RECIPES = ["rowwise", "rowwise_with_gw_hp", "mxfp8(rounding=rceil)",
                  "mxfp8(rounding=floor,format=hybrid)", "nvfp4(sr=true,rht=true,wblocks=16x16)",
                  "nvfp4(sr=false,rht=false,wblocks=1x16)"]


def _resume_data():
    rng = np.random.default_rng(11)
    xs = rng.standard_normal((RESUME_STEPS, 32, 32)).astype(np.float32)
    xs[:, 4, :] *= np.float32(1e3)  # a row far larger than the rest
    cs = rng.standard_normal((RESUME_STEPS, 32, 8)).astype(np.float32)
    w = (rng.standard_normal((8, 32)) * 0.2).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    return xs, cs, w, b


class _TorchBlockRun:
    """One block-scaled Linear "0" under ``32-true,fp8=<recipe>``, SGD; the loss of step i is
    ``sum(y * c_i)``, so the output gradient is c_i and the weight gradient depends on the
    step's inputs, seed and step only (not on the weights)."""

    def __init__(self, policy, w, b):
        from dualprec_torch import Precision as TPrecision

        m = torch.nn.Sequential(torch.nn.Linear(32, 8))
        m[0].weight.data, m[0].bias.data = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
        self.prec = TPrecision(policy)
        self.model, self.opt = self.prec.setup(m, torch.optim.SGD(m.parameters(), lr=RESUME_LR))
        self.before = []  # (weight, [seed, step]) before each step taken

    def weights(self):
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}

    def state(self):
        return self.model[0].blockscale_state.tolist()

    def step(self, x, c):
        self.before.append((self.weights()["0.weight"], self.state()))
        self.prec.backward((self.model(torch.from_numpy(x)) * torch.from_numpy(c)).sum())
        self.prec.step(self.opt)
        self.opt.zero_grad()

    def save(self, path):
        from dualprec_torch import checkpoint as tck

        tck.save_training(path, self.model, self.opt, self.prec)

    def load(self, path):
        from dualprec_torch import checkpoint as tck

        tck.load_training(path, self.model, self.opt, self.prec)


class _JaxBlockRun:
    """The same layer and training in JAX through `Precision` (linen Dense "0", optax SGD
    wrapped by the policy, the [seed, step] state in the FP8 collection)."""

    def __init__(self, policy, w, b, x0):
        import optax

        self.jp, self.model, self.v = _jax_one_dense(policy, x0, w, b)
        self.tx = self.jp.wrap_optimizer(optax.sgd(RESUME_LR))
        self.opt_state = self.tx.init(self.v["params"])
        jp, model, tx = self.jp, self.model, self.tx

        @jax.jit
        def step(v, opt_state, x, c):
            from dualprec_jax import fp8 as jfp8

            g = jax.grad(lambda v: jnp.sum(jp.apply(model, v, x) * c))(v)
            updates, opt_state = tx.update(g["params"], opt_state, v["params"])
            v = {**v, "params": optax.apply_updates(v["params"], updates)}
            return jfp8.apply_fp8_grads(v, g), opt_state

        self._step = step
        self.before = []

    def weights(self):
        p = self.v["params"]["0"]
        return {"0.weight": np.asarray(p["kernel"]).T.copy(), "0.bias": np.asarray(p["bias"]).copy()}

    def state(self):
        from dualprec_jax import fp8 as jfp8

        return jfp8.state_tensors(self.v)["fp8.0.blockscale.state"].tolist()

    def step(self, x, c):
        self.before.append((self.weights()["0.weight"], self.state()))
        self.v, self.opt_state = self._step(self.v, self.opt_state, jnp.asarray(x), jnp.asarray(c))

    def save(self, path):
        from dualprec_jax import checkpoint as jck

        jck.save_training(path, self.v["params"], self.opt_state, self.jp, variables=self.v)

    def load(self, path):
        from dualprec_jax import checkpoint as jck

        _, self.opt_state, self.v = jck.load_training(path, self.v["params"], self.opt_state, self.jp,
                                                      variables=self.v)


def _parts(side, recipe, x, w, c, state):
    seed, step = state
    if side == "torch":
        return tbs.block_linear_parts(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(c), recipe, seed, step)
    return jbs.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w), jnp.asarray(c), recipe, seed, step)


def _checkpoint_params(path):
    from dualprec import checkpoint

    return {k: np.asarray(v) for k, v in checkpoint.load_training_file(path)["params"].items()}


def _codes_differ(a, b, keys):
    return sorted(k for k in keys if not _same(a[k], b[k]))


@pytest.mark.slow  # compiles the JAX step per recipe
@pytest.mark.parametrize("spec", RESUME_RECIPES)
def test_block_recipe_run_resumes_in_the_other_framework_and_in_jax(spec, tmp_path):
    """Each recipe, 4 SGD steps straight in torch and in JAX, and 2 steps, a training
    checkpoint on disk (`save_training`: weights, optimizer, precision state with the `fp8`
    extension's [seed, step]), then 2 steps in a fresh run of either framework.

    - JAX resumed from JAX: weights and state bit-identical to JAX's straight run.
    - across frameworks: the loaded weights are the saved bits and the state is [seed, 2];
      at the first resumed step every code and scale (x, w, g and their transposes) is
      bit-identical to the other framework's straight run; at the next step the codes of x
      and g (which do not depend on the weights) still are, the weight codes may not be (the
      weights then differ by float32 summation order); the state ends at [seed, 4] in both;
      the weights agree within lr * 1e-5 * (max|dW3| + max|dW4|) plus 4 float32 ulps (the
      bias: with max_j sum_i |c_ij| for max|dW|), the float32-summation allowance the other
      tests of this file use for one GEMM.
    """
    from dualprec import Policy

    recipe = Policy.parse(f"32-true,fp8={spec}").fp8
    policy = f"32-true,fp8={spec}"
    xs, cs, w, b = _resume_data()
    seed = tbs.layer_seed("0")
    runs = {"torch": lambda: _TorchBlockRun(policy, w, b), "jax": lambda: _JaxBlockRun(policy, w, b, xs[0])}
    straight, files = {}, {}
    for name, make in runs.items():
        run = make()
        for i in range(RESUME_STEPS):
            run.step(xs[i], cs[i])
        straight[name] = run
        half = make()
        for i in range(RESUME_SPLIT):
            half.step(xs[i], cs[i])
        files[name] = tmp_path / f"{name}.safetensors"
        half.save(files[name])
        assert half.state() == [seed, RESUME_SPLIT]
    # the two straight runs: the same state; weights within the bound below
    assert straight["torch"].state() == straight["jax"].state() == [seed, RESUME_STEPS]

    # JAX resumes JAX: bit for bit
    again = runs["jax"]()
    again.load(files["jax"])
    assert again.state() == [seed, RESUME_SPLIT]
    for i in range(RESUME_SPLIT, RESUME_STEPS):
        again.step(xs[i], cs[i])
    for k, v in straight["jax"].weights().items():
        assert np.array_equal(v.view(np.uint32), again.weights()[k].view(np.uint32)), k
    assert again.state() == [seed, RESUME_STEPS]

    for src, dst in (("torch", "jax"), ("jax", "torch")):
        resumed = runs[dst]()
        resumed.load(files[src])
        saved = _checkpoint_params(files[src])
        for k, v in resumed.weights().items():  # the checkpoint's bits, in the other framework
            assert np.array_equal(v.view(np.uint32), saved[k].view(np.uint32)), (src, dst, k)
        assert resumed.state() == [seed, RESUME_SPLIT]
        dws = []
        for i in range(RESUME_SPLIT, RESUME_STEPS):
            resumed.step(xs[i], cs[i])
            (w_r, st_r), (w_s, st_s) = resumed.before[-1], straight[src].before[i]
            assert st_r == st_s == [seed, i]
            mine, theirs = _parts(dst, recipe, xs[i], w_r, cs[i], st_r), _parts(src, recipe, xs[i], w_s, cs[i], st_s)
            codes = [k for k in theirs if k not in ("y", "dx", "dw")]
            if i == RESUME_SPLIT:
                assert np.array_equal(w_r.view(np.uint32), w_s.view(np.uint32))
                assert _codes_differ(mine, theirs, codes) == [], (src, dst, i)
            else:
                assert _codes_differ(mine, theirs, [k for k in codes if not k.startswith("w")]) == [], (src, dst, i)
            dws.append(float(np.max(np.abs(_np(theirs["dw"])))))
        assert resumed.state() == straight[src].state() == [seed, RESUME_STEPS]
        # the bias gradient is the column sum of c_i: its largest possible size is max_j sum_i |c_ij|
        dbs = [float(np.max(np.sum(np.abs(cs[i]), axis=0))) for i in range(RESUME_SPLIT, RESUME_STEPS)]
        for k, v in straight[src].weights().items():
            ulp = np.spacing(np.float32(np.max(np.abs(v))))
            bound = RESUME_LR * 1e-5 * sum(dws if k.endswith("weight") else dbs) + 4 * ulp
            np.testing.assert_allclose(resumed.weights()[k], v, rtol=0, atol=bound, err_msg=f"{src}->{dst} {k}")
