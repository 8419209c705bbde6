"""The Flax linen twin of fragile_torch.py: same module names, same math."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .fragile_torch import LOGIT_OFFSET, QUIET


class SharpAttention(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(self.d, use_bias=False, name="q")(x)
        k = nn.Dense(self.d, use_bias=False, name="k")(x)
        v = nn.Dense(self.d, name="v")(x)
        s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * q.shape[-1] ** -0.5 + LOGIT_OFFSET
        p = jax.nn.softmax(s, axis=-1)
        return jnp.matmul(p, v)


class HugeNorm(nn.Module):
    d: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        w = self.param("proj_weight", nn.initializers.lecun_normal(), (self.d, self.d), jnp.float32)
        h = jnp.matmul(x, w.T)
        scale = self.param("scale", nn.initializers.ones, (self.d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.d,), jnp.float32)
        mu = h.mean(-1, keepdims=True)
        dev = h - mu
        var = (dev * dev).mean(-1, keepdims=True)
        return dev / jnp.sqrt(var + self.eps) * scale + bias


class Fragile(nn.Module):
    d: int = 32
    n_out: int = 8

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.d, name="embed")(x)
        h = h + SharpAttention(self.d, name="scores")(h)
        h = HugeNorm(self.d, name="norm")(h)
        # a NumPy constant: ``jnp.ones(...).at[0].set(...)`` traces a scatter whose literal
        # index dualprec_jax.autocast's pattern matcher cannot hash (TypeError: unhashable Literal)
        quiet = jnp.asarray(np.array([QUIET] + [1.0] * (self.d - 1), np.float32))
        h = h + nn.Dense(self.d, name="outlier")(h * quiet)
        return nn.Dense(self.n_out, name="head")(h.mean(axis=1))
