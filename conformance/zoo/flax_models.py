"""The model zoo in Flax linen, twins of torch_models.py: same module names, same math
(exact-erf GELU, the same norm epsilons), Flax layouts (Dense [in, out], Conv HWIO, NHWC)."""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualprec_jax import ops as dp_ops

#: The norm epsilons of the torch twins (module constants so a mutant can change them).
LN_EPS, RMS_EPS, GN_EPS = 1e-5, 1e-6, 1e-5


def gelu(x):
    """torch's exact-erf GELU: its kernels compute half inputs in float32 and round once."""
    return jax.nn.gelu(x.astype(jnp.promote_types(x.dtype, jnp.float32)), approximate=False).astype(x.dtype)


def matmul(a, b):
    """torch.matmul on half inputs: products accumulated in float32, rounded once."""
    wide = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.matmul(a, b, preferred_element_type=wide).astype(jnp.result_type(a, b))


def scale(x, c: float):
    """``x * c`` as torch forms it: the Python scalar taken in float32 (JAX's weak typing
    would round it to the half dtype first), the product rounded once."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(wide) * jnp.asarray(c, wide)).astype(x.dtype)


def avg_pool(x, window):
    """torch's avg_pool2d: its CPU and CUDA kernels sum half-precision inputs in float32 and
    round once; ``nn.avg_pool`` sums in the input dtype (a bfloat16 rounding per add, which
    under bf16-true made 5% of the pooled values 1 ULP off and the conv2 weight gradient
    24 ULP off after GroupNorm's backward amplified it)."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return nn.avg_pool(x.astype(wide), window, window).astype(x.dtype)


class MLP(nn.Module):
    d_hidden: int = 32
    n_out: int = 8

    @nn.compact
    def __call__(self, x):
        x = gelu(nn.Dense(self.d_hidden, name="fc1")(x))
        x = gelu(nn.Dense(self.d_hidden, name="fc2")(x))
        return nn.Dense(self.n_out, name="head")(x)


def _qkv_heads(x, heads):
    """The fused qkv projection (a Dense named "qkv", as torch's zoo model) split into
    q, k, v of shape (batch, heads, tokens, head_dim); call inside a compact method."""
    b, t, d = x.shape
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class Attention(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dh = d // self.heads
        q, k, v = _qkv_heads(x, self.heads)
        scores = scale(matmul(q, jnp.swapaxes(k, -1, -2)), 1.0 / math.sqrt(dh))
        # torch autocast runs softmax in float32 (its fp32 list) and casts the probabilities
        # back for the next matmul; dualprec_jax's softmax is that rule for hand-written JAX
        probs = dp_ops.softmax(scores, axis=-1).astype(v.dtype)
        out = matmul(probs, v)
        return nn.Dense(d, name="proj")(out.transpose(0, 2, 1, 3).reshape(b, t, d))


class FeedForward(nn.Module):
    d: int
    mult: int = 4

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d, name="fc2")(gelu(nn.Dense(self.mult * self.d, name="fc1")(x)))


class TransformerBlock(nn.Module):
    d: int = 32
    heads: int = 4
    n_out: int = 8

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.d, self.heads, name="attn")(nn.LayerNorm(epsilon=LN_EPS, name="ln1")(x))
        x = x + FeedForward(self.d, name="mlp")(nn.RMSNorm(epsilon=RMS_EPS, name="ln2")(x))
        return nn.Dense(self.n_out, name="head")(x.mean(axis=1))


class CNN(nn.Module):
    n_out: int = 10

    @nn.compact
    def __call__(self, x):  # NHWC
        x = nn.Conv(8, (3, 3), padding=1, name="conv1")(x)
        x = avg_pool(nn.relu(nn.GroupNorm(num_groups=4, epsilon=GN_EPS, name="norm1")(x)), (2, 2))
        x = nn.Conv(16, (3, 3), padding=1, name="conv2")(x)
        x = avg_pool(nn.relu(nn.GroupNorm(num_groups=4, epsilon=GN_EPS, name="norm2")(x)), (2, 2))
        return nn.Dense(self.n_out, name="head")(x.mean(axis=(1, 2)))


# ----- the op-by-op twin: plain jnp, the op table applied by dualprec_jax.autocast --------
def active_policy():
    """The policy of the innermost dualprec linen interceptor (``Precision.apply``/``init``
    install one), None outside.  The hand-written pieces below run under
    ``dualprec_jax.autocast`` with it, so their plain jnp ops follow the op table as torch's
    ops follow torch autocast; Flax calls ``__call__`` at trace time, so this is static."""
    from flax.linen import module as linen_module

    from dualprec_jax import flax_linen

    for interceptor in linen_module._global_interceptor_stack:  # innermost first
        if getattr(interceptor, "func", None) is flax_linen._intercept:
            return interceptor.args[0]
    return None


def under_table(fun, *args):
    """``fun(*args)`` under the active policy's op table (as written when there is none).
    The linen interceptor is already active around it: nothing more is entered."""
    policy = active_policy()
    if policy is None:
        return fun(*args)
    from dualprec_jax import autocast

    return autocast(fun, policy, context=contextlib.nullcontext)(*args)


def rms_norm(x, g, eps):
    return x * jax.lax.rsqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + eps) * g


def attention_core(q, k, v):
    return jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) * q.shape[-1] ** -0.5, axis=-1) @ v


def swiglu(a, b):
    return jax.nn.silu(a) * b


class HandRMSNorm(nn.Module):
    eps: float = RMS_EPS

    @nn.compact
    def __call__(self, x):
        g = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return under_table(lambda x, g: rms_norm(x, g, self.eps), x, g)


class HandAttention(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        out = under_table(attention_core, *_qkv_heads(x, self.heads))
        return nn.Dense(d, name="proj")(out.transpose(0, 2, 1, 3).reshape(b, t, d))


class SwiGLU(nn.Module):
    d: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        a, b = nn.Dense(self.hidden, name="fc1")(x), nn.Dense(self.hidden, name="fc3")(x)
        return nn.Dense(self.d, name="fc2")(under_table(swiglu, a, b))


class OpByOp(nn.Module):
    d: int = 32
    heads: int = 2
    hidden: int = 64
    n_out: int = 8

    @nn.compact
    def __call__(self, x):
        x = x + HandAttention(self.d, self.heads, name="attn")(HandRMSNorm(name="ln1")(x))
        x = x + SwiGLU(self.d, self.hidden, name="mlp")(HandRMSNorm(name="ln2")(x))
        return nn.Dense(self.n_out, name="head")(x.mean(axis=1))


BUILDERS = {"mlp": MLP, "transformer": TransformerBlock, "cnn": CNN, "opbyop": OpByOp}


def build(name: str) -> nn.Module:
    return BUILDERS[name]()
