"""The GPT of gpt_pair.py written in Flax nnx, as a user would: the same module names
(nnx list members are path entries of their own: ``blocks/0/attn/qkv/kernel``)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from gpt_pair import D, H, L, T, V, gelu

from conformance.zoo.flax_models import matmul, scale
from dualprec_jax import ops as dp_ops


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        dh = d // H
        qkv = self.qkv(x).reshape(b, t, 3, H, dh).transpose(2, 0, 3, 1, 4)
        # the scale taken in float32 as torch takes a Python scalar (JAX's weak typing would
        # round it to bfloat16 first: compare() names blocks.0.attn when written `* c`)
        att = scale(matmul(qkv[0], jnp.swapaxes(qkv[1], -1, -2)), 1.0 / math.sqrt(dh))
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -jnp.inf)
        y = matmul(dp_ops.softmax(att, axis=-1).astype(qkv[2].dtype), qkv[2])
        return self.proj(y.transpose(0, 2, 1, 3).reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, rngs, bug=""):
        self.fc1 = nnx.Linear(D, 4 * D, rngs=rngs)
        self.fc2 = nnx.Linear(4 * D, D, rngs=rngs)
        self.tanh = bug == "gelu-tanh"

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x), approximate=self.tanh))


class Block(nnx.Module):
    def __init__(self, rngs, bug=""):
        eps = 1e-6 if bug == "ln-eps" else 1e-5
        self.ln1 = nnx.LayerNorm(D, epsilon=eps, rngs=rngs)
        self.attn = Attention(rngs)
        self.ln2 = nnx.LayerNorm(D, epsilon=eps, rngs=rngs)
        self.mlp = MLP(rngs, bug)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NnxGPT(nnx.Module):
    """``bug``: "gelu-tanh" or "ln-eps", planted as in gpt_pair.FlaxGPT."""

    def __init__(self, rngs=None, bug=""):
        rngs = rngs or nnx.Rngs(0)
        self.tok = nnx.Embed(V, D, rngs=rngs)
        self.pos = nnx.Embed(T, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs, bug) for _ in range(L)])
        self.ln_f = nnx.LayerNorm(D, epsilon=1e-5, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids) + self.pos(jnp.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.embedding[...].T  # the head tied to the token embedding
