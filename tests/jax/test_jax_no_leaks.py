"""autocast leaves nothing behind: jitted functions run under it (under two policies), then
plainly, give the bits and dtypes of a process that never imported dualprec; a jitted helper
traced plainly first still gets the table inside autocast; the rule of an op does not depend
on how it was imported or whether it runs inside scan/checkpoint."""

import functools
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec_jax import Precision, autocast
from tests.jax import leak_functions as lf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # tens of seconds of XLA compilation on the shared CPU
def test_plain_calls_after_autocast_equal_a_process_without_dualprec(tmp_path):
    out = tmp_path / "clean.npz"
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "tests.jax.leak_functions", str(out)], check=True, cwd=ROOT, env=env,
                   timeout=300)
    clean = np.load(out)

    for policy in ("16-mixed", "bf16-mixed"):  # each traces every function under the table
        for dtype in lf.DTYPES:
            x, w = lf.inputs(dtype)
            under = jax.jit(autocast(lambda x, w: {k: f(x, w) for k, f in lf.FUNCTIONS.items()}, policy))(x, w)
            assert under["softmax"].dtype == jnp.float32  # the table did run
    # Precision.apply of a Flax model too (the linen interceptor traced inside)
    import flax.linen as nn

    Precision("16-mixed").apply(nn.Dense(8), lf._DENSE_VARS, lf.inputs("float16")[0])

    after = lf.run_all()
    wrong = []
    for key, got in after.items():
        ref = clean[key.replace("/", "__")]
        if str(got.dtype) != str(clean["dtype__" + key.replace("/", "__")]):
            wrong.append(f"{key}: dtype {got.dtype}, clean process {clean['dtype__' + key.replace('/', '__')]}")
        elif not np.array_equal(lf.bits(got), ref):
            wrong.append(f"{key}: bits differ")
    assert not wrong, wrong
    assert len(after) == len(lf.FUNCTIONS) * len(lf.DTYPES)


def test_jitted_helper_traced_plainly_first_gets_the_table():
    x = jnp.linspace(-2, 2, 32).reshape(4, 8).astype(jnp.bfloat16)
    helper = jax.jit(lambda x: jax.nn.softmax(x) @ jnp.ones((8, 8), jnp.float32))
    assert helper(x).dtype == jnp.float32  # plain: bf16 softmax, then promotion with float32
    soft = jax.jit(lambda x: jax.nn.softmax(x))
    assert soft(x).dtype == jnp.bfloat16
    got = autocast(lambda x: (soft(x), helper(x)), "bf16-mixed")(x)
    assert got[0].dtype == jnp.float32  # softmax is on the float32 list
    assert got[1].dtype == jnp.bfloat16  # the matmul is on the lower list
    assert soft(x).dtype == jnp.bfloat16  # and plain again afterwards


def test_jitted_flax_and_activation_helpers_traced_plainly_first_get_the_table():
    import flax.linen as nn

    x = (jnp.linspace(-3, 3, 64).reshape(4, 16) ** 3).astype(jnp.float32)
    dense = jax.jit(lambda v, x: nn.Dense(8).apply(v, x))
    v = nn.Dense(8).init(jax.random.key(0), x)
    assert dense(v, x).dtype == jnp.float32  # traced plainly first
    assert autocast(dense, "bf16-mixed")(v, x).dtype == jnp.bfloat16  # the stock layer's rule
    gelu = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
    xb = x.astype(jnp.bfloat16)
    gelu(xb)
    direct = autocast(lambda x: jax.nn.gelu(x, approximate=False), "bf16-mixed")(xb)
    through = autocast(gelu, "bf16-mixed")(xb)
    assert np.array_equal(np.asarray(direct, np.float32), np.asarray(through, np.float32))


# ----- the rule of an op does not depend on how it was imported or where it runs ------------
def _many(x):
    """512 distinct half values from ``x`` (activations: enough inputs to see a formula)."""
    return (x.reshape(-1)[:, None] * jnp.linspace(0.5, 1.5, 16, dtype=jnp.float32)).astype(x.dtype)


def _by_name_and_by_attribute():
    import optax
    from jax.nn import gelu, logsumexp, silu, softmax
    from jax.numpy import dot, mean, tensordot, var, vdot
    from optax import sigmoid_binary_cross_entropy

    w = jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(8, 8)

    def by_name(x, xf):
        return {"softmax": softmax(x), "logsumexp": logsumexp(x), "tensordot": tensordot(xf, w, axes=1),
                "bce": sigmoid_binary_cross_entropy(x, jnp.ones_like(x)), "gelu": gelu(x @ w.astype(x.dtype)),
                "gelu_exact": gelu(_many(x), approximate=False), "silu": silu(_many(x)), "mean": mean(x, -1),
                "var": var(x, -1), "vdot": vdot(x[0], xf[1]), "dot": dot(x[0], xf[1])}

    def by_attribute(x, xf):
        return {"softmax": jax.nn.softmax(x), "logsumexp": jax.nn.logsumexp(x),
                "tensordot": jnp.tensordot(xf, w, axes=1),
                "bce": optax.sigmoid_binary_cross_entropy(x, jnp.ones_like(x)),
                "gelu": jax.nn.gelu(x @ w.astype(x.dtype)), "gelu_exact": jax.nn.gelu(_many(x), approximate=False),
                "silu": jax.nn.silu(_many(x)), "mean": jnp.mean(x, -1), "var": jnp.var(x, -1),
                "vdot": jnp.vdot(x[0], xf[1]), "dot": jnp.dot(x[0], xf[1])}

    return by_name, by_attribute


EXPECTED = {"softmax": jnp.float32, "logsumexp": jnp.float32, "tensordot": jnp.float32, "bce": jnp.float32,
            "gelu": jnp.bfloat16, "gelu_exact": jnp.bfloat16, "silu": jnp.bfloat16, "mean": jnp.bfloat16,
            "var": jnp.bfloat16, "vdot": jnp.float32, "dot": jnp.float32}  # torch.dot: promote


@pytest.mark.parametrize("where", ["plain", "scan", "checkpoint"])
def test_rule_does_not_depend_on_the_import(where):
    by_name, by_attribute = _by_name_and_by_attribute()
    x = jnp.linspace(-3, 3, 32, dtype=jnp.float32).reshape(4, 8).astype(jnp.bfloat16)
    xf = x.astype(jnp.float32)

    def placed(fun):
        if where == "scan":
            return lambda x, xf: jax.tree.map(lambda a: a[0], jax.lax.scan(lambda c, _: (c, fun(x, xf)), 0.0, None,
                                                                             length=1)[1])
        if where == "checkpoint":
            return jax.checkpoint(fun)
        return fun

    a = jax.jit(autocast(placed(by_name), "bf16-mixed"))(x, xf)
    b = jax.jit(autocast(placed(by_attribute), "bf16-mixed"))(x, xf)
    for k, dtype in EXPECTED.items():
        assert a[k].dtype == b[k].dtype == dtype, (k, a[k].dtype, b[k].dtype)
    # the same bits whichever way they were reached (activations: torch's formula either way)
    for k in EXPECTED:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


# ----- promote semantics and the Flax counterparts of lower-list ops ------------------------
@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed"])
def test_promote_list_dot_and_scatter(policy):
    half = jnp.float16 if policy == "16-mixed" else jnp.bfloat16
    a, b = jnp.arange(4, dtype=half), jnp.linspace(0, 1, 4, dtype=jnp.float32)
    # torch.dot / vdot (promote): the widest input; torch.matmul of matrices (lower): compute
    assert autocast(lambda a, b: jnp.dot(a, b), policy)(a, b).dtype == jnp.float32
    assert autocast(lambda a, b: jnp.vdot(a, b), policy)(a, b).dtype == jnp.float32
    assert autocast(lambda a, b: jnp.dot(a[None], b[:, None]), policy)(a, b).dtype == half
    # index_put / scatter_add (promote): x.at[i].set/add of a float32 value into a half x
    with pytest.warns(FutureWarning):  # JAX warns about the implicit cast it would make
        got = autocast(lambda a, b: (a.at[1:3].set(b[:2]), a.at[1:3].add(b[:2])), policy)(a, b)
    assert [g.dtype for g in got] == [jnp.float32, jnp.float32]
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray([0, 0, 1 / 3, 3], np.float32))  # float32 values kept
    # a cast written by the user is kept
    kept = autocast(lambda a, b: a.astype(jnp.float32).at[1:3].set(b[:2]).astype(half), policy)(a, b)
    assert kept.dtype == half


@pytest.mark.slow  # tens of seconds of XLA compilation on the shared CPU
def test_flax_prelu_and_rnn_cells_run_in_the_compute_dtype():
    import flax.linen as nn
    from flax import nnx

    prec = Precision("bf16-mixed")
    x = jnp.linspace(-1, 1, 40, dtype=jnp.float32).reshape(2, 5, 4)
    prelu = nn.PReLU()
    assert prec.autocast(lambda v, x: prelu.apply(v, x))(prec.init(prelu, jax.random.key(0), x), x).dtype == jnp.bfloat16
    for cell in (nn.LSTMCell(8), nn.GRUCell(8)):
        carry = cell.initialize_carry(jax.random.key(0), (2, 4))
        v = prec.init(cell, jax.random.key(1), carry, x[:, 0])
        new, y = prec.autocast(lambda v, c, x: cell.apply(v, c, x))(v, carry, x[:, 0])
        assert y.dtype == jnp.bfloat16, type(cell).__name__
        # the carry keeps the dtype it came in (a scan carry), with compute-dtype values
        assert all(c.dtype == jnp.float32 for c in jax.tree.leaves(new))
        assert all(np.array_equal(np.asarray(c), np.asarray(c.astype(jnp.bfloat16).astype(jnp.float32)))
                   for c in jax.tree.leaves(new))
        # and through nn.RNN (a scan over the cell)
        rnn = nn.RNN(cell)
        assert prec.autocast(lambda v, x: rnn.apply(v, x))(prec.init(rnn, jax.random.key(2), x), x).dtype == jnp.bfloat16

    class M(nnx.Module):
        def __init__(self, rngs):
            self.act, self.cell = nnx.PReLU(), nnx.GRUCell(4, 8, rngs=rngs)

        def __call__(self, x):
            h = self.act(x)
            return h, self.cell(self.cell.initialize_carry(h.shape, nnx.Rngs(1)), h)[1]

    h, y = prec.setup(M(nnx.Rngs(0)))(x[:, 0])
    assert h.dtype == y.dtype == jnp.bfloat16


# ----- module attributes: never replaced ---------------------------------------------------
def _watched_modules():
    import flax.linen as nn
    import jax.image
    import jax.numpy.linalg
    import jax.scipy.special
    import optax
    from flax import nnx

    return (jax.nn, jnp, jax.numpy.linalg, jax.scipy.special, jax.image, jax.lax, optax, nn, nnx)


def _snapshot():
    """Every attribute (public and private) of the modules a table composite lives in."""
    return {(m.__name__, k): v for m in _watched_modules() for k, v in list(vars(m).items())}


@pytest.mark.slow  # about 10 s: every preset traced twice
def test_module_attributes_are_never_replaced():
    """Every attribute of jax.nn, jax.numpy (and linalg), jax.scipy.special, jax.image,
    jax.lax, optax, flax.linen and flax.nnx is the same object before, during (inside a traced
    function, a linen module's call included) and after autocast / Precision.init /
    Precision.apply under every preset: the table is applied to the jaxpr, never by replacing
    a function."""
    import flax.linen as nn

    from dualprec.presets import preset_names

    before = _snapshot()
    assert len(before) > 1000
    seen = []

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            seen.append(_snapshot())
            h = nn.gelu(nn.Dense(4)(x)) + jax.nn.softmax(x[:, :4]) + jnp.sum(x[:, :4], -1, keepdims=True)
            return h + jnp.cumsum(x[:, :4], -1, dtype=x.dtype) + jax.nn.logsumexp(x, -1, keepdims=True)

    x = jnp.linspace(-1, 1, 16, dtype=jnp.float32).reshape(2, 8)
    model = Probe()
    checked = 0
    for name in preset_names(include_aliases=False):  # traced only (eval_shape): fast
        jax.eval_shape(autocast(lambda x: (seen.append(_snapshot()), jax.nn.gelu(x) + jnp.mean(x) + jax.nn.softmax(x)
                                           + jnp.sum(x, dtype=jnp.float32))[1], name), x)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a float64 preset's x64 note
                prec = Precision(name)
        except Exception:  # noqa: BLE001, S112 - presets this CPU cannot run (FP8...): autocast alone
            continue
        try:
            variables = jax.eval_shape(functools.partial(prec.init, model, jax.random.key(0), x))
        except jax.errors.ConcretizationTypeError:  # quantizing presets look at the values
            variables = prec.init(model, jax.random.key(0), x)
        jax.eval_shape(functools.partial(prec.apply, model), variables, x)
        checked += 1
    assert checked >= 5 and seen
    for snap in seen:
        changed = sorted(k for k, v in before.items() if snap.get(k) is not v)
        assert not changed, changed
    after = _snapshot()
    assert not sorted(k for k, v in before.items() if after.get(k) is not v)
