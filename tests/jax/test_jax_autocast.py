"""dualprec_jax.autocast: torch's CUDA autocast table applied to any JAX function.

Dtype tests per table entry, jaxpr-level tests that the rewrite reaches inside jit, scan,
remat, custom_vjp (and the other sub-jaxprs), composition with grad/vmap/jit, and the
warnings for what it cannot see into.  Tiny shapes throughout.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core

from dualprec_jax import Precision
from dualprec_jax.autocast import AutocastWarning, autocast

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
POLICIES = {"bf16-mixed": BF16, "16-mixed": F16}


@pytest.fixture
def xw():
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (4, 8)), jax.random.normal(kw, (8, 8)) * 0.3


# (name, op applied to the half-precision matmul output h, expected dtype: "c" compute or f32)
TABLE = [
    ("matmul", lambda h, x, w: h, "c"),
    ("einsum", lambda h, x, w: jnp.einsum("ij,jk->ik", x, w), "c"),
    ("tensordot", lambda h, x, w: jnp.tensordot(x, w, 1), "f32"),  # promote list: the widest input
    ("tensordot_half", lambda h, x, w: jnp.tensordot(h, w, 1), "f32"),
    ("conv", lambda h, x, w: lax.conv_general_dilated(x[None, None], w[None, None, :3, :3], (1, 1), "SAME"), "c"),
    ("exp", lambda h, x, w: jnp.exp(h), "f32"),
    ("log", lambda h, x, w: jnp.log(jnp.abs(h) + 1), "f32"),
    ("pow", lambda h, x, w: h ** 2, "f32"),
    ("rsqrt", lambda h, x, w: lax.rsqrt(jnp.abs(h) + 1), "f32"),
    ("reciprocal", lambda h, x, w: jnp.reciprocal(h), "f32"),
    ("sum", lambda h, x, w: jnp.sum(h, -1), "f32"),
    ("sum_method", lambda h, x, w: h.sum(-1), "f32"),
    ("cumsum", lambda h, x, w: jnp.cumsum(h, -1), "f32"),
    ("prod", lambda h, x, w: jnp.prod(h, -1), "f32"),
    ("softmax", lambda h, x, w: jax.nn.softmax(h), "f32"),
    ("log_softmax", lambda h, x, w: jax.nn.log_softmax(h), "f32"),
    ("logsumexp", lambda h, x, w: jax.nn.logsumexp(h, -1), "f32"),
    ("norm", lambda h, x, w: jnp.linalg.norm(h, axis=-1), "f32"),
    ("softplus", lambda h, x, w: jax.nn.softplus(h), "f32"),
    ("mse", lambda h, x, w: optax.l2_loss(h, x), "f32"),
    ("sum_dtype", lambda h, x, w: jnp.sum(h.astype(BF16), -1, dtype=BF16), "bf16"),  # explicit: kept
    ("sum_dtype_of_f32", lambda h, x, w: jnp.sum(x, -1, dtype=BF16), "bf16"),
    ("prod_dtype", lambda h, x, w: jnp.prod(h.astype(BF16), -1, dtype=BF16), "bf16"),
    ("cumsum_dtype_of_f32", lambda h, x, w: jnp.cumsum(x, -1, dtype=BF16), "bf16"),
    ("cumprod_dtype_of_f32", lambda h, x, w: jnp.cumprod(x, -1, dtype=BF16), "bf16"),
    ("cumsum_dtype_f32", lambda h, x, w: jnp.cumsum(h, -1, dtype=F32), "f32"),
    ("lax_reduce_sum", lambda h, x, w: lax.reduce_sum(h, (1,)), "f32"),  # by hand: the table's rule
    # on no list: the input dtype
    ("mean", lambda h, x, w: jnp.mean(h, -1), "c"),
    ("mean_method", lambda h, x, w: h.mean(-1), "c"),
    ("var", lambda h, x, w: jnp.var(h, -1), "c"),
    ("std", lambda h, x, w: jnp.std(h, -1), "c"),
    ("gelu", lambda h, x, w: jax.nn.gelu(h), "c"),
    ("relu", lambda h, x, w: jax.nn.relu(h), "c"),
    ("silu", lambda h, x, w: jax.nn.silu(h), "c"),
    ("tanh", lambda h, x, w: jnp.tanh(h), "c"),
    ("max", lambda h, x, w: jnp.max(h, -1), "c"),
    ("scaled", lambda h, x, w: h * 0.5 + 1.0, "c"),
    # promotion: the widest input
    ("bias", lambda h, x, w: h + w[0], "f32"),
    ("cat", lambda h, x, w: jnp.concatenate([h, x]), "f32"),
    ("exp_times_h", lambda h, x, w: jnp.exp(h) * h, "f32"),
]


@pytest.mark.parametrize("policy", POLICIES)
def test_table_dtypes(policy, xw):
    """Every entry in one traced function (one trace per policy keeps this fast)."""
    def all_ops(x, w):
        h = x @ w
        return {name: op(h, x, w) for name, op, _ in TABLE}

    out = jax.eval_shape(autocast(all_ops, policy), *xw)
    want = {name: {"c": POLICIES[policy], "f32": F32, "bf16": BF16}[expect] for name, _, expect in TABLE}
    got = {name: out[name].dtype for name in want}
    assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}


def test_matmul_accumulates_in_float32_and_rounds_once(xw):
    x, w = xw
    ours = autocast(lambda x, w: x @ w, "bf16-mixed")(x, w)
    ref = lax.dot_general(x.astype(BF16), w.astype(BF16), (((1,), (0,)), ((), ())),
                          preferred_element_type=F32).astype(BF16)
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))


def test_exp_of_half_is_computed_in_float32():
    x = jnp.linspace(-3, 3, 64).astype(BF16)
    ours = autocast(jnp.exp, "bf16-mixed")(x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jnp.exp(x.astype(F32))))


def test_softmax_of_half_is_float32_softmax(xw):
    h = (xw[0] @ xw[1]).astype(BF16)
    ours = autocast(jax.nn.softmax, "bf16-mixed")(h)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.nn.softmax(h.astype(F32))))


def test_not_mixed_is_the_identity(xw):
    x, w = xw
    assert autocast(lambda x, w: x @ w, "32-true")(x, w).dtype == F32


# ----- the jaxpr: sub-jaxprs reached ----------------------------------------------------------
def _eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, (core.Jaxpr, core.ClosedJaxpr)):
                    yield from _eqns(sub)


def _dots(fun, *args):
    return [e for e in _eqns(jax.make_jaxpr(fun)(*args)) if e.primitive.name == "dot_general"]


def _assert_half_dots(dots, n=None):
    assert dots and (n is None or len(dots) == n), dots
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [BF16, BF16], e
        assert e.params["preferred_element_type"] == F32, e


def test_reaches_inside_jit(xw):
    inner = jax.jit(lambda x, w: x @ w)
    fun = autocast(lambda x, w: inner(x, w) * 2, "bf16-mixed")
    _assert_half_dots(_dots(fun, *xw), 1)
    assert fun(*xw).dtype == BF16


def test_reaches_inside_scan(xw):
    def f(x, w):
        def step(c, _):
            return jnp.tanh(c @ w), jnp.sum(c)
        return lax.scan(step, x, None, length=3)

    fun = autocast(f, "bf16-mixed")
    _assert_half_dots(_dots(fun, *xw))
    carry, sums = fun(*xw)
    assert carry.dtype == F32  # loop carries keep their dtype
    assert sums.dtype == F32


def test_reaches_inside_remat(xw):
    fun = autocast(jax.checkpoint(lambda x, w: jnp.exp(x @ w)), "bf16-mixed")
    _assert_half_dots(_dots(fun, *xw), 1)
    assert any(e.primitive.name == "remat2" for e in jax.make_jaxpr(fun)(*xw).eqns)
    g = jax.grad(lambda x, w: fun(x, w).sum())(*xw)
    assert g.dtype == F32 and np.isfinite(np.asarray(g)).all()


@jax.custom_vjp
def _mm(x, w):
    return x @ w


def _mm_fwd(x, w):
    return x @ w, (x, w)


def _mm_bwd(res, g):
    x, w = res
    return 3.0 * (g @ w.T), 3.0 * (x.T @ g)  # a rule autodiff would not give: 3x


_mm.defvjp(_mm_fwd, _mm_bwd)


def test_reaches_inside_custom_vjp_and_keeps_its_rule(xw):
    fun = autocast(lambda x, w: _mm(x, w), "bf16-mixed")
    assert any(e.primitive.name == "dot_general" and e.invars[0].aval.dtype == BF16
               for e in _eqns(jax.make_jaxpr(fun)(*xw)))
    assert fun(*xw).dtype == BF16
    gx = jax.grad(lambda x: fun(x, xw[1]).astype(F32).sum())(xw[0])
    ref = 3.0 * jnp.ones((4, 8)) @ xw[1].T
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ref), rtol=1e-6)


def test_reaches_inside_custom_jvp():
    @jax.custom_jvp
    def f(x):
        return jnp.exp(x)

    f.defjvp(lambda p, t: (f(p[0]), 5.0 * t[0]))
    x = jnp.linspace(-1, 1, 8).astype(BF16)
    fun = autocast(f, "bf16-mixed")
    assert fun(x).dtype == F32
    assert jax.jvp(fun, (x,), (jnp.ones_like(x),))[1].dtype == F32
    np.testing.assert_allclose(np.asarray(jax.jvp(fun, (x,), (jnp.ones_like(x),))[1]), 5.0)


def test_relu_keeps_custom_jvp_call_untouched():
    x = jnp.linspace(-1, 1, 8).astype(BF16)
    jaxpr = jax.make_jaxpr(autocast(jax.nn.relu, "bf16-mixed"))(x)
    calls = [e for e in jaxpr.eqns if e.primitive.name == "custom_jvp_call"]
    assert len(calls) == 1 and calls[0].outvars[0].aval.dtype == BF16


def test_while_and_cond(xw):
    x, w = xw

    def f(x, w):
        y = lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1), (x, 0))[0]
        return lax.cond(y.sum() > 0, lambda a: a @ w, lambda a: -a @ w, y)

    fun = autocast(f, "bf16-mixed")
    _assert_half_dots(_dots(fun, x, w))
    out = jax.jit(fun)(x, w)
    assert out.dtype == F32  # cond outputs keep their traced dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(f(x, w)), atol=0.1)


def test_unlisted_op_keeps_its_dtype():
    x = jnp.linspace(-1, 1, 8).astype(BF16)
    jaxpr = jax.make_jaxpr(autocast(lambda x: jnp.abs(x) * 2 - jnp.maximum(x, 0.1), "bf16-mixed"))(x)
    assert all(v.aval.dtype == BF16 for e in jaxpr.eqns for v in (*e.invars, *e.outvars)), jaxpr
    y = jnp.linspace(-1, 1, 8)  # float32 stays float32: nothing is cast down
    assert autocast(lambda y: jnp.abs(y) * 2, "bf16-mixed")(y).dtype == F32


# ----- composition --------------------------------------------------------------------------
def test_grad_backward_gemms_in_compute_dtype(monkeypatch, xw):
    from dualprec_jax import ops

    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    loss = autocast(lambda x, w: (x @ w).astype(F32).sum(), "bf16-mixed")
    _assert_half_dots(_dots(jax.grad(loss, argnums=(0, 1)), *xw), 3)


def test_jit_grad_vmap(xw):
    x, w = xw

    def f(x, w):
        return jnp.sum(jax.nn.softmax(x @ w) * jnp.tanh(x @ w))

    fun = autocast(f, "bf16-mixed")
    ref = float(jax.jit(fun)(x, w))
    gx, gw = jax.jit(jax.grad(fun, argnums=(0, 1)))(x, w)
    assert gx.dtype == gw.dtype == F32
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jax.grad(f)(x, w)), atol=0.05)
    xs = jnp.stack([x, 2 * x])
    batched = jax.jit(jax.vmap(fun, in_axes=(0, None)))(xs, w)
    np.testing.assert_allclose(np.asarray(batched), [ref, float(jax.jit(fun)(2 * x, w))], rtol=1e-6)
    inner = jax.jit(autocast(jax.vmap(f, in_axes=(0, None)), "bf16-mixed"))(xs, w)
    np.testing.assert_allclose(np.asarray(inner), np.asarray(batched), rtol=1e-6)


def test_static_arguments_and_pytrees(xw):
    x, w = xw
    fun = autocast(lambda p, n, act="tanh": getattr(jnp, act)(p["x"] @ p["w"]) * n, "bf16-mixed")
    assert fun({"x": x, "w": w}, 3, act="exp").dtype == F32


def test_shard_map_and_sharded_jit(xw):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("d",))
    x = jax.device_put(xw[0], NamedSharding(mesh, P("d")))
    w = jax.device_put(xw[1], NamedSharding(mesh, P()))
    f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
    fun = jax.jit(autocast(f, "bf16-mixed"))
    assert fun(x, w).dtype == BF16
    _assert_half_dots(_dots(autocast(f, "bf16-mixed"), x, w), 1)


# ----- what it cannot see into --------------------------------------------------------------
def test_pure_callback_warns_and_keeps_dtypes():
    x = jnp.linspace(-1, 1, 8).astype(BF16)

    def f(x):
        y = jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return jnp.exp(y)

    with pytest.warns(AutocastWarning, match="pure_callback"):
        out = autocast(f, "bf16-mixed")(x)
    assert out.dtype == F32  # the exp after it is still under the table


def test_custom_primitive_warns_and_keeps_dtypes():
    from jax.interpreters import mlir

    prim = core.Primitive("my_double")
    prim.def_impl(lambda x: x * 2)
    prim.def_abstract_eval(lambda x: x)
    mlir.register_lowering(prim, mlir.lower_fun(lambda x: x * 2, multiple_results=False))
    w = jnp.ones((8, 8))
    fun = autocast(lambda x: prim.bind(x @ w), "bf16-mixed")
    with pytest.warns(AutocastWarning, match="my_double"):
        jaxpr = jax.make_jaxpr(fun)(jnp.ones((2, 8)))
    call = next(e for e in jaxpr.eqns if e.primitive is prim)
    assert call.invars[0].aval.dtype == F32  # the dtype it was traced with


def test_no_warning_for_plain_code(xw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutocastWarning)
        jax.eval_shape(autocast(lambda x, w: jax.nn.gelu(x @ w).sum(), "bf16-mixed"), *xw)


# ----- Precision.autocast and Flax models ----------------------------------------------------
class _Hand(nn.Module):
    """Stock layers and hand-written ops mixed: one mechanism for both."""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Dense(16, name="fc1")(x))
        w = self.param("w", nn.initializers.lecun_normal(), (16, 8))
        return jax.nn.softmax(h @ w)


def test_precision_autocast_runs_linen_models(xw):
    x = xw[0]
    prec = Precision("bf16-mixed")
    model = _Hand()
    variables = prec.init(model, jax.random.key(1), x)
    fun = jax.jit(prec.autocast(lambda v, x: model.apply(v, x)))
    out = fun(variables, x)
    assert out.dtype == F32  # softmax: float32 list
    # fc1 is the interceptor's Dense (bias before the rounding); the hand-written @ is lowered
    dots = _dots(prec.autocast(lambda v, x: model.apply(v, x)), variables, x)
    _assert_half_dots(dots, 2)
    p = variables["params"]
    h = jax.nn.relu(_linear(x, p["fc1"]["kernel"], p["fc1"]["bias"]))
    ref = jax.nn.softmax(lax.dot_general(h, p["w"].astype(BF16), (((1,), (0,)), ((), ())),
                                         preferred_element_type=F32).astype(BF16).astype(F32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with prec.autocast():  # still the context manager without an argument
        assert model.apply(variables, x).dtype == F32


def _linear(x, k, b):
    y = lax.dot_general(x.astype(BF16), k.astype(BF16), (((1,), (0,)), ((), ())), preferred_element_type=F32)
    return (y + b.astype(BF16).astype(F32)).astype(BF16)


def test_precision_autocast_runs_nnx_models(xw):
    from flax import nnx

    class M(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return jnp.exp(self.fc(x)) @ self.fc.kernel[...]

    prec = Precision("bf16-mixed")
    model = prec.setup(M(nnx.Rngs(0)))
    out = prec.autocast(lambda x: model(x))(xw[0])
    assert out.dtype == BF16  # exp -> float32, then the hand-written matmul -> bfloat16
    grads = nnx.grad(lambda m, x: prec.autocast(lambda x: m(x))(x).astype(F32).sum())(model, xw[0])
    assert grads.fc.kernel[...].dtype == F32


# ----- every JAX callable of the op table ----------------------------------------------------
_H = (4, 4)
_SPECIAL_CALLS = {  # callables that do not take (h,) or (h, h)
    "jax.lax.conv_general_dilated": lambda f, h: f(h[None, None], h[None, None], (1, 1), "SAME"),
    "jax.lax.conv": lambda f, h: f(h[None, None], h[None, None], (1, 1), "SAME"),
    "jax.lax.conv_with_general_padding": lambda f, h: f(h[None, None], h[None, None], (1, 1), "SAME", None, None),
    "jax.lax.conv_transpose": lambda f, h: f(h[None, None], h[None, None], (1, 1), "SAME",
                                              dimension_numbers=("NCHW", "OIHW", "NCHW")),
    "jax.numpy.convolve": lambda f, h: f(h[0], h[1]),
    "jax.lax.dot_general": lambda f, h: f(h, h, (((1,), (0,)), ((), ()))),
    "jax.numpy.einsum": lambda f, h: f("ij,jk->ik", h, h),
    "jax.numpy.linalg.multi_dot": lambda f, h: f([h, h, h]),
    "jax.nn.dot_product_attention": lambda f, h: f(h[None, :, None], h[None, :, None], h[None, :, None]),
    "jax.lax.integer_pow": lambda f, h: f(h, 2),
    "jax.lax.reduce_sum": lambda f, h: f(h, (0,)),
    "jax.image.resize": lambda f, h: f(h, (8, 8), "linear"),
    "optax.softmax_cross_entropy_with_integer_labels": lambda f, h: f(h, jnp.zeros(4, jnp.int32)),
    "jax.numpy.cross": lambda f, h: f(h[:, :3], h[:, :3]),
}


def _table_callables():
    from dualprec import optable

    for e in optable.ENTRIES:
        for name in e.jax:
            if name.startswith("flax.") or "[" in name or name.startswith("jax.Array."):
                continue  # Flax layers: the interceptor (tested with Precision); methods: via jnp
            yield e, name


def _call(name, h):
    import importlib

    mod_name, attr = name.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    f = getattr(mod, attr)  # looked up at call time, as user code does
    if name in _SPECIAL_CALLS:
        return _SPECIAL_CALLS[name](f, h)
    try:
        return f(h)
    except TypeError:
        return f(h, h)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_table_callable_has_the_tables_dtype(policy):
    from dualprec import optable

    h = jnp.linspace(0.1, 0.9, 16).reshape(_H).astype(POLICIES[policy])
    wrong = {}
    for e, name in _table_callables():
        out = jax.eval_shape(autocast(lambda h: _call(name, h), policy), h)
        want = optable.dtype_of(e, policy, [jnp.dtype(POLICIES[policy]).name])
        if jnp.dtype(out.dtype).name != want:
            wrong[name] = (jnp.dtype(out.dtype).name, want)
    assert not wrong, wrong


def test_explicit_dtype_reductions_keep_the_bits_of_plain_jax(xw):
    """An explicit half dtype= of sum/prod/cumsum is kept (torch keeps it): found in the jaxpr
    (a jnp reduction in a half dtype; a cast to half inside jnp.cumsum), the same bits as
    plain JAX."""
    x = xw[0]
    h = x.astype(BF16)

    def f(x, h):
        return (jnp.sum(h, -1, dtype=BF16), jnp.sum(x, -1, dtype=BF16), jnp.prod(h, -1, dtype=BF16),
                jnp.cumsum(x, -1, dtype=BF16), jnp.cumprod(x * 0.1, -1, dtype=F16))

    got, want = jax.jit(autocast(f, "bf16-mixed"))(x, h), jax.jit(f)(x, h)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g.astype(F32)), np.asarray(w.astype(F32)))


def test_pallas_call_is_left_alone():
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.exp(x_ref[...])  # a kernel's dtypes are its author's

    x = jnp.ones((8, 128), BF16)
    f = lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutocastWarning)
        out = jax.eval_shape(autocast(f, "bf16-mixed"), x)
    assert out.dtype == BF16


def test_prng_keys_scatter_and_integer_ops(xw):
    x, w = xw

    def f(key, x, w):
        h = x @ w
        h = jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h / 0.9, 0)
        idx = jnp.argmax(h, -1)
        return h.at[0].add(jnp.exp(h[1])), idx

    with warnings.catch_warnings():
        warnings.simplefilter("error", AutocastWarning)
        g, idx = jax.eval_shape(autocast(f, "bf16-mixed"), jax.random.key(0), x, w)
    assert g.dtype == F32 and idx.dtype == jnp.int32


def test_a_composite_traced_half_runs_in_the_dtype_it_receives():
    """jnp.mean traced for a bf16 input ends with a rounding back to bf16; when an fp32-list
    op widened its input (x ** 2), torch's x.pow(2).mean() is float32, and so is ours.  A
    mean of a half input that nothing widened stays half (mean is on no list)."""
    import torch

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32))).astype(jnp.bfloat16)
    got = autocast(lambda x: jnp.mean(x ** 2, axis=-1), "bf16-mixed")(x)
    xt = torch.from_numpy(np.asarray(x.astype(jnp.float32))).bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):
        want = xt.float().pow(2).mean(-1)  # CUDA autocast: pow on the fp32 list, mean on none
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
    assert autocast(lambda x: jnp.mean(x, axis=-1), "bf16-mixed")(x).dtype == jnp.bfloat16
    assert autocast(lambda x: jnp.var(jnp.exp(x), axis=-1), "bf16-mixed")(x).dtype == jnp.float32


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed"])
def test_python_scalars_are_read_as_written(policy):
    """JAX rounds a Python number to the half dtype it meets while tracing (``x ** 1.7`` of a
    float16 ``x``: ``pow x 1.7001953``).  Where the table makes that op float32, the number is
    the one written, as torch keeps a Python scalar in double: the bits of the op computed in
    float32 with float32(1.7), not with the half-rounded constant."""
    half = POLICIES[policy]
    x = jnp.linspace(0.1, 4, 64, dtype=jnp.float32).astype(half)
    xf = x.astype(jnp.float32)
    got = autocast(lambda x: (x ** 1.7, jnp.power(x, 0.3), jax.nn.softmax(x) * 0.1,
                              jax.nn.leaky_relu(-x)), policy)(x)
    want = (xf ** np.float32(1.7), jnp.power(xf, np.float32(0.3)), jax.nn.softmax(xf) * np.float32(0.1),
            jnp.where(-xf > 0, -xf, -xf * np.float32(0.01)).astype(half))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # a constant that is a half number already stays that number
    exact = autocast(lambda x: x ** 1.5, policy)(x)
    np.testing.assert_array_equal(np.asarray(exact), np.asarray(xf ** np.float32(1.5)))


def test_a_cast_after_a_float32_composite_is_held_by_pin_dtype():
    """``softmax(x).astype(x.dtype)`` of a half ``x``: while JAX traces, softmax is half and the
    cast is a no-op that leaves nothing in the jaxpr, so the table's float32 softmax reaches
    the caller (a documented limitation: no function is replaced while tracing).
    ``pin_dtype(softmax(x), x.dtype)`` holds the dtype: torch's bits, rounded once."""
    from dualprec_jax.autocast import pin_dtype

    x = jnp.linspace(-2, 2, 16, dtype=F32).reshape(2, 8).astype(BF16)
    assert autocast(lambda x: jax.nn.softmax(x).astype(x.dtype), "bf16-mixed")(x).dtype == F32
    got = autocast(lambda x: pin_dtype(jax.nn.softmax(x), x.dtype), "bf16-mixed")(x)
    assert got.dtype == BF16
    want = jax.nn.softmax(x.astype(F32)).astype(BF16)
    np.testing.assert_array_equal(np.asarray(got.astype(F32)), np.asarray(want.astype(F32)))
