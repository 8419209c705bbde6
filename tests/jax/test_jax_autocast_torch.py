"""dualprec_jax.autocast against torch: activations bit for bit against torch's opmath
(its float32 kernel on the half inputs, one rounding), and a block written op by op in both
frameworks (attention with @ and softmax, RMSNorm from pow/mean/rsqrt, SwiGLU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec_jax import autocast

torch = pytest.importorskip("torch")  # the torch extra; CI installs it
F = torch.nn.functional

N = 200_000
# name: (JAX call under autocast, torch's kernel, least bitwise-equal fraction bf16, fp16)
ACTIVATIONS = {
    # exact GELU: XLA's and torch's float32 erf-GELU differ for negative inputs (1 + erf(x/sqrt2)
    # cancels), which float16's finer grid shows on ~6% of elements (measured 94.3% on an
    # AVX512 CPU with the float32 opmath reference); a known gap, not a rounding rule
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), F.gelu, 0.97, 0.93),
    "gelu_tanh": (lambda x: jax.nn.gelu(x, approximate=True), lambda t: F.gelu(t, approximate="tanh"),
                  0.995, 0.995),
    "silu": (lambda x: jax.nn.silu(x), F.silu, 0.999, 0.999),
    "sigmoid": (lambda x: jax.nn.sigmoid(x), torch.sigmoid, 0.999, 0.999),
    "tanh": (lambda x: jnp.tanh(x), torch.tanh, 0.999, 0.999),
    "softplus": (lambda x: jax.nn.softplus(x), F.softplus, 0.999, 0.999),
    "elu": (lambda x: jax.nn.elu(x), F.elu, 0.999, 0.999),
    "leaky_relu": (lambda x: jax.nn.leaky_relu(x), F.leaky_relu, 0.999, 0.999),
    "mish": (lambda x: jax.nn.mish(x), F.mish, 0.999, 0.999),
    "hardswish": (lambda x: jax.nn.hard_swish(x), F.hardswish, 0.999, 0.999),
}


def _equal(a, b):
    return float(np.mean((a == b) | (np.isnan(a) & np.isnan(b))))


def activation_agreement(dtype, n=N, seed=0):
    """{name: (ours, native JAX)} bitwise-equal fractions against torch's kernel on ``dtype``."""
    x32 = (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)
    x = jnp.asarray(x32).astype(dtype)
    tx = torch.from_numpy(np.array(x.astype(jnp.float32))).to(getattr(torch, jnp.dtype(dtype).name))

    def all_acts(x):
        return {k: f(x) for k, (f, *_) in ACTIVATIONS.items()}

    def rounded(outs):
        # softplus is on the float32 list (float32 out): rounded once to compare with the
        # kernel (outside the traced function: a cast written inside, after the composite, is
        # a no-op while JAX traces and is not in the jaxpr)
        return {k: v.astype(dtype) for k, v in outs.items()}

    ours = rounded(jax.jit(autocast(all_acts, "bf16-mixed"))(x))
    native = rounded(jax.jit(all_acts)(x))
    out = {}
    for k, (_, tf, *_) in ACTIVATIONS.items():
        # torch's opmath, independent of this CPU's half-precision kernels: the float32 kernel on
        # the half inputs, rounded once (torch's bfloat16/float16 CPU kernels vary with the ISA:
        # with AVX512-FP16 its float16 GELU agrees with its own float32 one on only ~94%)
        ref = tf(tx.float()).to(tx.dtype).float().numpy()
        out[k] = (_equal(np.asarray(ours[k].astype(jnp.float32)), ref),
                  _equal(np.asarray(native[k].astype(jnp.float32)), ref))
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_activations_match_torch_kernels(dtype):
    got = activation_agreement(jnp.dtype(dtype))
    print(f"\nbitwise-equal vs torch CPU kernel, {dtype}, {N} inputs (autocast / native JAX):")
    for k, (ours, native) in got.items():
        print(f"  {k:11s} {ours:9.4%}  {native:9.4%}")
    col = 2 if dtype == "bfloat16" else 3
    low = {k: v[0] for k, v in got.items() if v[0] < ACTIVATIONS[k][col]}
    assert not low, low


def test_softplus_is_float32_list():
    x = jnp.linspace(-3, 3, 16).astype(jnp.bfloat16)
    assert autocast(lambda x: jax.nn.softplus(x), "bf16-mixed")(x).dtype == jnp.float32
    assert autocast(lambda x: jax.nn.silu(x), "bf16-mixed")(x).dtype == jnp.bfloat16


# ----- a block written op by op in both frameworks -----------------------------------------
T, D, H = 8, 16, 32
EPS = 1e-6


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"g1": (D,), "wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "g2": (D,),
              "w1": (D, H), "w3": (D, H), "w2": (H, D)}
    p = {k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for k, s in shapes.items()}
    p["g1"], p["g2"] = 1 + 0.1 * p["g1"], 1 + 0.1 * p["g2"]
    return p, rng.standard_normal((T, D)).astype(np.float32)


def jax_block(x, p):
    def rms(x, g):
        return x * jax.lax.rsqrt(jnp.mean(x ** 2, -1, keepdims=True) + EPS) * g

    h = rms(x, p["g1"])
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    a = jax.nn.softmax((q @ k.T) * D ** -0.5, axis=-1) @ v
    x = x + a @ p["wo"]
    h = rms(x, p["g2"])
    return x + (jax.nn.silu(h @ p["w1"]) * (h @ p["w3"])) @ p["w2"]


def torch_block(x, p):
    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * g

    h = rms(x, p["g1"])
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    a = torch.softmax((q @ k.T) * D ** -0.5, dim=-1) @ v
    x = x + a @ p["wo"]
    h = rms(x, p["g2"])
    return x + (F.silu(h @ p["w1"]) * (h @ p["w3"])) @ p["w2"]


def block_agreement(policy):
    """(bitwise-equal fraction, max |diff| / max |torch|) of the block's output and input
    gradient, JAX autocast against dualprec_torch's Precision (CUDA's table, on CPU)."""
    from dualprec_torch import Precision as TorchPrecision

    p, x = _params()
    tp = {k: torch.tensor(v) for k, v in p.items()}
    tx = torch.tensor(x, requires_grad=True)
    with TorchPrecision(policy).autocast():
        ty = torch_block(tx, tp)
    ty.float().sum().backward()
    fun = autocast(jax_block, policy)

    def forward_and_grad(x, p):
        y, vjp = jax.vjp(lambda x: fun(x, p), x)
        return y, vjp(jnp.ones_like(y))[0]

    jy, jg = jax.jit(forward_and_grad)(jnp.asarray(x), {k: jnp.asarray(v) for k, v in p.items()})
    out = {}
    for name, ours, ref in (("output", jy, ty.detach()), ("input grad", jg, tx.grad)):
        assert str(ours.dtype) == str(ref.dtype).removeprefix("torch."), (name, ours.dtype, ref.dtype)
        ours, ref = np.asarray(ours, np.float32), ref.float().numpy()
        out[name] = (_equal(ours, ref), float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))))
    return out


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed"])
def test_op_by_op_block_agrees_with_torch(policy):
    got = block_agreement(policy)
    print(f"\n{policy}: " + ", ".join(f"{k}: {eq:.2%} bitwise equal, max rel diff {d:.2e}"
                                      for k, (eq, d) in got.items()))
    half_ulp = 2.0 ** -8 if policy == "bf16-mixed" else 2.0 ** -11
    for name, (eq, diff) in got.items():
        assert diff <= 4 * half_ulp, (name, diff)
    # Forward: the same table, the same roundings (measured: 100%).  Backward, measured: max
    # relative difference 2e-7 with XLA_FLAGS=--xla_allow_excess_precision=false, about one
    # half-precision ulp (3e-3) under XLA's default, which may skip half-precision roundings
    # inside fusions.
    assert got["output"][0] >= 0.99, got["output"]


def test_stock_layer_model_agrees_with_torch():
    """Dense -> GELU(tanh) -> LayerNorm -> Dense -> Dense: the issue's model (36% bitwise
    equal with Precision.apply's interceptor alone, whose GELU is JAX's bf16 formula)."""
    import flax.linen as nn

    from dualprec_jax import Precision
    from dualprec_torch import Precision as TorchPrecision

    d, h, b = 32, 64, 128

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm(epsilon=1e-5, name="ln")(jax.nn.gelu(nn.Dense(h, name="a")(x), approximate=True))
            return nn.Dense(d, name="c")(nn.Dense(h, name="b")(x))

    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(approximate="tanh"), torch.nn.LayerNorm(h),
                             torch.nn.Linear(h, h), torch.nn.Linear(h, d))
    dense = lambda m: {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}  # noqa: E731
    ln = {"scale": jnp.asarray(tm[2].weight.detach().numpy()), "bias": jnp.asarray(tm[2].bias.detach().numpy())}
    variables = {"params": {"a": dense(tm[0]), "ln": ln, "b": dense(tm[3]), "c": dense(tm[4])}}
    x = np.random.default_rng(0).standard_normal((b, d)).astype(np.float32)
    for policy, least in (("bf16-mixed", 0.99), ("16-mixed", 0.97)):
        with TorchPrecision(policy).autocast():
            ref = tm(torch.from_numpy(x)).float().detach().numpy()
        prec = Precision(policy)
        ours = jax.jit(prec.autocast(lambda v, x: M().apply(v, x)))(variables, jnp.asarray(x))
        eq = _equal(np.asarray(ours.astype(jnp.float32)), ref)
        print(f"\n{policy}: {eq:.2%} bitwise equal")
        assert eq >= least, (policy, eq)
