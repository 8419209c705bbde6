"""Shared models and their hand-written reference math for the JAX backend tests.

The reference is the op policy written out in jax.numpy/lax without Flax or dualprec_jax:
matmuls on compute-dtype operands accumulated in float32, bias added in float32, one
rounding; layer norms in float32 (Flax's fast-variance formula); attention scores, softmax
in float32.  Tests compare Flax models run through Precision against it bit for bit.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

D, H, HEADS, T = 8, 16, 2, 4  # model width, MLP width, heads, tokens: tiny on purpose


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch's nn.GELU() default


# Not conformance.zoo's models on purpose: these are stock Flax layers (nn.Dense,
# nn.LayerNorm, nn.MultiHeadDotProductAttention, their nnx twins) at tiny sizes, because the
# tests check how Precision drives Flax's own modules against the reference math below.  The
# zoo's Flax models wrap their ops (torch-style GELU, matmul, scalar scaling) to mirror the
# torch twins op for op, which is a different thing to test.
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="fc2")(gelu(nn.Dense(H, name="fc1")(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + MLP(LN(x))."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h)
        h = nn.LayerNorm(name="ln2")(x)
        return x + MLP(name="mlp")(h)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, H, rngs=rngs)
        self.fc2 = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = NnxMLP(rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


# ----- the same math by hand ------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _autocast_dot(x, k, contract, prec, acc):
    """x @ k over x's last ``contract`` axes, accumulated in ``acc``.  Backward as torch
    autocast computes it: half-precision cotangent, each gradient a half-precision GEMM
    accumulated in ``acc`` and rounded once (plain autodiff would promote to float32 GEMMs)."""
    dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
    return lax.dot_general(x, k, dims, precision=prec, preferred_element_type=acc)


def _autocast_dot_fwd(x, k, contract, prec, acc):
    return _autocast_dot(x, k, contract, prec, acc), (x, k)


def _autocast_dot_bwd(contract, prec, acc, res, g):
    x, k = res
    dtypes = x.dtype, k.dtype
    # g holds compute-dtype values; half products are exact in acc, so computing in acc is the
    # half GEMM accumulated in acc (and XLA's CPU runtime lacks some BF16 x BF16 = F32 dots).
    g, x, k = (t.astype(dtypes[0]).astype(acc) for t in (g, x, k))
    n_out, n_batch = k.ndim - contract, x.ndim - contract
    gx = jnp.tensordot(g, k, axes=(tuple(range(g.ndim - n_out, g.ndim)), tuple(range(contract, k.ndim))),
                       precision=prec, preferred_element_type=acc)
    gk = jnp.tensordot(x, g, axes=(tuple(range(n_batch)), tuple(range(n_batch))), precision=prec,
                       preferred_element_type=acc)
    return gx.astype(dtypes[0]), gk.astype(dtypes[1])


_autocast_dot.defvjp(_autocast_dot_fwd, _autocast_dot_bwd)
class Ref:
    """Hand-written forward passes under dtypes (param, compute, output, mixed)."""

    def __init__(self, compute, output, mixed):
        self.c = jnp.dtype(compute)
        self.o = jnp.dtype(output)
        self.acc = jnp.dtype(jnp.float64 if self.c == jnp.float64 else jnp.float32)
        self.mixed = mixed
        self.norm_out = self.acc if mixed else self.c
        self.prec = lax.Precision.HIGHEST if self.c in (jnp.float32, jnp.float64) else None

    def dense(self, x, p, contract=1):
        k = p["kernel"].astype(self.c)
        if self.c in (jnp.bfloat16, jnp.float16):
            y = _autocast_dot(x.astype(self.c), k, contract, self.prec, self.acc)
        else:
            dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
            y = lax.dot_general(x.astype(self.c), k, dims, precision=self.prec, preferred_element_type=self.acc)
        return (y + p["bias"].astype(self.c).astype(self.acc)).astype(self.c)

    def layer_norm(self, x, p, eps=1e-6):
        x = x.astype(self.acc)
        mu = x.mean(-1, keepdims=True)
        var = jnp.maximum(0.0, (x * x).mean(-1, keepdims=True) - mu * mu)
        mul = lax.rsqrt(var + eps) * p["scale"].astype(self.acc)
        return ((x - mu) * mul + p["bias"].astype(self.acc)).astype(self.norm_out)

    def gelu(self, x):
        """Under a mixed policy the op table computes an activation on half inputs as torch's
        kernel does (its formula in float32, one rounding); otherwise JAX's own gelu."""
        if not (self.mixed and x.dtype in (jnp.bfloat16, jnp.float16)):
            return gelu(x)
        from dualprec_jax.ops import torch_activation

        return torch_activation("gelu", jax.nn.gelu, x.astype(jnp.float32), (), {"approximate": False}).astype(x.dtype)

    def mlp(self, x, p):
        return self.dense(self.gelu(self.dense(x, p["fc1"])), p["fc2"])

    def attention(self, x, p):
        q, k, v = (self.dense(x, p[n]) for n in ("query", "key", "value"))  # [t, heads, depth]
        s = jnp.einsum("qhd,khd->hqk", q, k, precision=self.prec, preferred_element_type=self.acc)
        w = jax.nn.softmax(s * jnp.asarray(q.shape[-1], self.acc) ** -0.5, axis=-1)
        o = jnp.einsum("hqk,khd->qhd", w.astype(self.c), v, precision=self.prec,
                       preferred_element_type=self.acc).astype(self.c)
        return self.dense(o, p["out"], contract=2)

    def block(self, x, p):
        x = x + self.attention(self.layer_norm(x, p["ln1"]), p["attn"])
        return x + self.mlp(self.layer_norm(x, p["ln2"]), p["mlp"])


def loss_of(y):
    return jnp.mean(jnp.square(y.astype(jnp.promote_types(y.dtype, jnp.float32))))


def bits(tree):
    """Leaves as raw bit patterns, for bit-for-bit comparisons (NaN payloads included)."""
    def view(x):
        x = np.asarray(x)
        return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]) if x.dtype.kind == "f" else x
    return jax.tree_util.tree_map(view, tree)


def assert_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(bits(a))
    lb, tb = jax.tree_util.tree_flatten(bits(b))
    assert ta == tb
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.dtype == y.dtype, f"leaf {i}: {x.dtype} vs {y.dtype}"
        diff = int((x != y).sum())
        assert diff == 0, f"leaf {i}: {diff} of {x.size} elements differ"


@pytest.fixture
def x64():
    """Run a test with jax_enable_x64 on, and leave it off afterwards for everyone else."""
    before = jax.config.read("jax_enable_x64")
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def data():
    return jax.random.normal(jax.random.key(1), (T, D), jnp.float32)
