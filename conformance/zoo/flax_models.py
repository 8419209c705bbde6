"""The model zoo in Flax linen, twins of torch_models.py: same module names, same math
(exact-erf GELU, the same norm epsilons), Flax layouts (Dense [in, out], Conv HWIO, NHWC)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


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


class Attention(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, t, 3, h, dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(dh))
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.matmul(probs, v)
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
        x = x + Attention(self.d, self.heads, name="attn")(nn.LayerNorm(epsilon=1e-5, name="ln1")(x))
        x = x + FeedForward(self.d, name="mlp")(nn.RMSNorm(epsilon=1e-6, name="ln2")(x))
        return nn.Dense(self.n_out, name="head")(x.mean(axis=1))


class CNN(nn.Module):
    n_out: int = 10

    @nn.compact
    def __call__(self, x):  # NHWC
        x = nn.Conv(8, (3, 3), padding=1, name="conv1")(x)
        x = avg_pool(nn.relu(nn.GroupNorm(num_groups=4, epsilon=1e-5, name="norm1")(x)), (2, 2))
        x = nn.Conv(16, (3, 3), padding=1, name="conv2")(x)
        x = avg_pool(nn.relu(nn.GroupNorm(num_groups=4, epsilon=1e-5, name="norm2")(x)), (2, 2))
        return nn.Dense(self.n_out, name="head")(x.mean(axis=(1, 2)))


BUILDERS = {"mlp": MLP, "transformer": TransformerBlock, "cnn": CNN}


def build(name: str) -> nn.Module:
    return BUILDERS[name]()
