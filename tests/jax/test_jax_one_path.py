"""One op-table path: `Precision.apply` / `init`, nnx and `TrainState` run the model under the
whole table (`dualprec_jax.autocast`), so the README's Flax path gives the agreement with
torch that the op-by-op tests prove; per-module overrides keep their own table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec_jax import Precision

torch = pytest.importorskip("torch")  # the torch extra; CI installs it

D_IN, WIDTH, D_OUT, BATCH = 64, 128, 64, 256

# name: (Flax activation as the README's model calls it, torch module)
ACTS = {
    "gelu": (lambda x: nn.gelu(x, approximate=False), lambda: torch.nn.GELU()),
    "gelu-tanh": (lambda x: nn.gelu(x), lambda: torch.nn.GELU(approximate="tanh")),
    "silu": (nn.silu, lambda: torch.nn.SiLU()),
    "sigmoid": (nn.sigmoid, lambda: torch.nn.Sigmoid()),
    "softplus": (nn.softplus, lambda: torch.nn.Softplus()),
    "relu": (nn.relu, lambda: torch.nn.ReLU()),
}


class ReadmeModel(nn.Module):
    """The README's Flax example shape: Dense -> ACT -> LayerNorm -> Dense -> Dense."""
    act: str = "gelu"

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(epsilon=1e-5, name="ln")(ACTS[self.act][0](nn.Dense(WIDTH, name="a")(x)))
        return nn.Dense(D_OUT, name="head")(nn.Dense(WIDTH, name="b")(x))


def _twins(act, seed=0):
    """(torch Sequential, the same weights as Flax variables, input)."""
    torch.manual_seed(seed)
    tm = torch.nn.Sequential(torch.nn.Linear(D_IN, WIDTH), ACTS[act][1](), torch.nn.LayerNorm(WIDTH),
                             torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, D_OUT))
    with torch.no_grad():  # LayerNorm with weights that are not all ones
        tm[2].weight.uniform_(0.5, 1.5)
        tm[2].bias.uniform_(-0.5, 0.5)

    def dense(m):
        return {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}

    ln = {"scale": jnp.asarray(tm[2].weight.detach().numpy()), "bias": jnp.asarray(tm[2].bias.detach().numpy())}
    variables = {"params": {"a": dense(tm[0]), "ln": ln, "b": dense(tm[3]), "head": dense(tm[4])}}
    x = (np.random.default_rng(seed).standard_normal((BATCH, D_IN)) * 2).astype(np.float32)
    return tm, variables, x


def readme_agreement(act, policy):
    """Bitwise-equal fraction of the outputs: torch ``Precision(policy).autocast()`` against
    ``prec.apply(model, variables, x)`` inside ``jax.jit`` (the README's path); and the dtypes."""
    from dualprec_torch import Precision as TorchPrecision

    tm, variables, x = _twins(act)
    tprec = TorchPrecision(policy)
    with tprec.autocast():
        ref = tprec.convert_output(tm(torch.from_numpy(x))).detach()
    prec = Precision(policy)
    ours = jax.jit(lambda v, x: prec.apply(ReadmeModel(act), v, x))(variables, jnp.asarray(x))
    assert str(ours.dtype) == str(ref.dtype).removeprefix("torch."), (ours.dtype, ref.dtype)
    a, b = np.asarray(ours, np.float32), ref.float().numpy()
    return float(np.mean(a == b))


@pytest.mark.parametrize("policy,least", [("bf16-mixed", 0.99), ("16-mixed", 0.98)])
def test_readme_flax_path_agrees_with_torch(policy, least):
    got = {act: readme_agreement(act, policy) for act in ACTS}
    print(f"\n{policy}, Precision.apply vs torch Precision.autocast, bitwise-equal outputs: "
          + ", ".join(f"{k} {v:.2%}" for k, v in got.items()))
    low = {k: v for k, v in got.items() if v < least}
    assert not low, low


# ----- the same path everywhere: TrainState, nnx, per-module overrides ----------------------
@pytest.mark.slow  # tens of seconds of XLA compilation on the shared CPU
def test_train_state_apply_fn_and_nnx_give_the_bits_of_precision_apply():
    import optax
    from flax import nnx

    from dualprec_jax.train_state import TrainState

    _, variables, x = _twins("gelu")
    x = jnp.asarray(x[:32])
    prec = Precision("bf16-mixed")
    model = ReadmeModel("gelu")
    ref = jax.jit(lambda v, x: prec.apply(model, v, x))(variables, x)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1), precision=prec)
    got = jax.jit(lambda s, x: s.apply_fn({"params": s.params}, x))(state, x)
    assert got.dtype == ref.dtype and np.array_equal(np.asarray(got), np.asarray(ref))

    class Twin(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(D_IN, WIDTH, rngs=rngs)
            self.ln = nnx.LayerNorm(WIDTH, epsilon=1e-5, rngs=rngs)
            self.b = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
            self.head = nnx.Linear(WIDTH, D_OUT, rngs=rngs)

        def __call__(self, x):
            return self.head(self.b(self.ln(nnx.gelu(self.a(x), approximate=False))))

    twin = prec.setup(Twin(nnx.Rngs(0)))
    p = variables["params"]
    for name in ("a", "b", "head"):
        getattr(twin, name).kernel.set_value(p[name]["kernel"])
        getattr(twin, name).bias.set_value(p[name]["bias"])
    twin.ln.scale.set_value(p["ln"]["scale"])
    twin.ln.bias.set_value(p["ln"]["bias"])
    direct = nnx.jit(lambda m, x: m(x))(twin, x)  # a plain call after setup: the table runs
    assert direct.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(direct.astype(jnp.float32)), np.asarray(ref))
    assert np.array_equal(np.asarray(prec.apply(twin, x)), np.asarray(ref))


class HandHead(nn.Module):
    """A head written with jnp ops: a per-module override must reach them too."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (x.shape[-1], 8), jnp.float32)
        return jax.nn.softmax(x @ w), jnp.exp(x).dtype


class WithHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="body")(x)
        y, _ = HandHead(name="head")(h)
        return y, (x @ jnp.ones((x.shape[-1], 4), jnp.float32))


@pytest.mark.slow  # tens of seconds of XLA compilation on the shared CPU
def test_per_module_override_reaches_hand_written_ops():
    x = jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(4, 16)
    for policy, head_dtype in (("bf16-mixed,@head=32-true", jnp.float32), ("bf16-mixed", jnp.bfloat16)):
        prec = Precision(policy)
        v = prec.init(WithHead(), jax.random.key(0), x)
        assert v["params"]["head"]["w"].dtype == jnp.float32
        jaxpr = jax.make_jaxpr(lambda v, x: prec.apply(WithHead(), v, x))(v, x)
        dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"] + [
            e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        operand_dtypes = {str(v.aval.dtype) for e in dots for v in e.invars[:2]}
        # the body Dense and the top-level x @ ones in bfloat16; the head's x @ w in its own
        # policy (32-true: the float32 weight is not cast, the product is float32)
        assert "bfloat16" in operand_dtypes
        assert ("float32" in operand_dtypes) == (head_dtype == jnp.float32), (policy, operand_dtypes)
        y, z = prec.apply(WithHead(), v, x)
        assert y.dtype == jnp.float32  # softmax: float32 under either table (output dtype too)


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)


class _TiedHead(nn.Module):
    """A model that ends in a non-stock op: a tied head through ``nn.Embed.attend``."""
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 16, name="embed")
        return embed.attend(nn.Dense(16, name="mid")(embed(tokens)))


class _MatmulHead(nn.Module):
    """... and one that ends in a hand-written matmul."""
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.3), (16, 8))
        return nn.Dense(16, name="mid")(x) @ w


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("model,make_x", [
    (_TiedHead(), lambda: jnp.arange(12).reshape(3, 4) % 32),
    (_MatmulHead(), lambda: jax.random.normal(jax.random.key(1), (4, 16))),
], ids=["embed-attend", "matmul"])
def test_apply_inside_autocast_keeps_the_output_dtype(policy, model, make_x):
    """``prec.autocast(lambda v, x: prec.apply(model, v, x))`` gives what ``prec.apply`` alone
    gives: the policy's output dtype (float32), the same bits, also when the model ends in an
    op the table lowers (the output cast is a no-op at trace time there)."""
    prec = Precision(policy)
    x = make_x()
    variables = prec.init(model, jax.random.key(0), x)
    alone = prec.apply(model, variables, x)
    nested = prec.autocast(lambda v, x: prec.apply(model, v, x))(variables, x)
    jitted = jax.jit(prec.autocast(lambda v, x: prec.apply(model, v, x)))(variables, x)
    assert alone.dtype == nested.dtype == jitted.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(nested), np.asarray(alone))
    # the head itself is lowered (compute-dtype values, then cast): not a float32 head
    assert np.array_equal(np.asarray(alone), np.asarray(alone.astype(prec.compute_dtype).astype(jnp.float32)))


def test_eager_apply_reuses_its_trace():
    """Eager `Precision.apply` traces a model once per argument shapes/dtypes (not once per
    call), with the same bits as a fresh trace; other shapes, models and flags trace anew."""
    prec = Precision("bf16-mixed")
    model = ReadmeModel("gelu-tanh")
    x = jax.random.normal(jax.random.key(1), (8, D_IN))
    variables = prec.init(model, jax.random.key(0), x)
    cache = prec._trace_cache
    first = prec.apply(model, variables, x)
    misses = cache.misses
    assert misses == 1
    for _ in range(3):
        again = prec.apply(model, variables, x + 1.0)
    assert cache.misses == misses  # no new trace
    fresh = Precision("bf16-mixed").apply(model, variables, x + 1.0)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(fresh))
    np.testing.assert_array_equal(np.asarray(prec.apply(model, variables, x)), np.asarray(first))
    prec.apply(model, variables, x[:4])  # another shape
    prec.apply(ReadmeModel("relu"), variables, x)  # another model
    prec.apply(model, variables, x.astype(jnp.bfloat16))  # another dtype
    assert cache.misses == misses + 3
    # inside jax.jit the arguments are tracers: jit's own cache, not this one
    jax.jit(lambda v, x: prec.apply(model, v, x))(variables, x)
    assert cache.misses == misses + 3
