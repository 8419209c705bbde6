"""A GPT-style LM written once in each framework, as a user would: vocab 64, d=32, 4 heads,
2 pre-LN blocks, a registered causal-mask buffer, GELU MLP, final LayerNorm, the LM head
tied to the token embedding, logits [B, T, V].  ``FlaxGPT(bug=...)`` plants one twin bug for
the power tests (:data:`BUGS`); "output-uncast" is planted in the JAX side's Precision instead
(:class:`UncastPrecision`: the model's output returned without the output cast)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from conformance.zoo.flax_models import active_policy, matmul, scale, under_table
from dualprec_jax import ops as dp_ops

V, D, H, T, L = 64, 32, 4, 16, 2

#: planted bug -> what it is (the Flax side differs from torch's by that alone)
BUGS = {
    "gelu-tanh": "tanh-approximated GELU (torch: exact erf)",
    "ln-eps": "LayerNorm eps 1e-6 (torch: 1e-5)",
    "softmax-half": "softmax in the scores' dtype, no autocast (exponentials rounded to it)",
    "accum-half": "mlp.fc1's GEMM accumulated in the compute dtype (no float32 accumulator)",
    "attn-scale": "attention scores scaled by 1/sqrt(d_model) (torch: 1/sqrt(head_dim))",
    "output-uncast": "the output returned in the compute dtype (the output cast skipped)",
}


class TorchAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.proj = torch.nn.Linear(D, D)
        self.register_buffer("mask", torch.tril(torch.ones(T, T, dtype=torch.bool)).view(1, 1, T, T))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, H, d // H).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // H))
        att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        y = torch.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(D, 4 * D)
        self.fc2 = torch.nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(D)
        self.attn = TorchAttention()
        self.ln2 = torch.nn.LayerNorm(D)
        self.mlp = TorchMLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(V, D)
        self.pos = torch.nn.Embedding(T, D)
        self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(L)])
        self.ln_f = torch.nn.LayerNorm(D)
        self.lm_head = torch.nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.tok.weight  # tied

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gelu(x, approximate=False):
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return jax.nn.gelu(x.astype(wide), approximate=approximate).astype(x.dtype)


class FlaxAttention(nn.Module):
    bug: str = ""

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dh = d // H
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, t, 3, H, dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = scale(matmul(q, jnp.swapaxes(k, -1, -2)), 1.0 / math.sqrt(d if self.bug == "attn-scale" else dh))
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -jnp.inf)
        if self.bug == "softmax-half":
            # the exponentials rounded to the scores' (half) dtype before normalising: an explicit
            # cast, which no autocast undoes (a plain jax.nn.softmax now gets the float32 rule
            # from Precision.apply's op table, as torch's softmax does under autocast)
            e = jnp.exp(att - att.max(-1, keepdims=True)).astype(att.dtype)
            probs = (e / e.sum(-1, keepdims=True)).astype(v.dtype)
        else:
            probs = dp_ops.softmax(att, axis=-1).astype(v.dtype)
        y = matmul(probs, v)
        return nn.Dense(d, name="proj")(y.transpose(0, 2, 1, 3).reshape(b, t, d))


class HalfAccDense(nn.Module):
    """A Dense whose GEMM accumulates in the compute dtype: each product (exact in float32)
    added to a running sum that is rounded to the compute dtype after every term, the bias
    added and rounded last; what a kernel without a float32 accumulator computes.  Under a
    float32 policy it is a float32 GEMM summed in order (no bug)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        policy = active_policy()
        c = jnp.dtype(policy.compute_dtype) if policy is not None else x.dtype
        xs, ws = x.astype(c).astype(jnp.float32), kernel.astype(c).astype(jnp.float32)
        acc = jnp.zeros(x.shape[:-1] + (self.features,), c)
        for i in range(x.shape[-1]):
            acc = (acc.astype(jnp.float32) + xs[..., i, None] * ws[i]).astype(c)
        return (acc.astype(jnp.float32) + bias.astype(c).astype(jnp.float32)).astype(c)


def dense(features, name, half_acc=False):
    return HalfAccDense(features, name=name) if half_acc else nn.Dense(features, name=name)


class FlaxMLP(nn.Module):
    bug: str = ""

    @nn.compact
    def __call__(self, x):
        h = gelu(dense(4 * D, "fc1", self.bug == "accum-half")(x), approximate=self.bug == "gelu-tanh")
        return nn.Dense(D, name="fc2")(h)


class FlaxBlock(nn.Module):
    bug: str = ""

    @nn.compact
    def __call__(self, x):
        eps = 1e-6 if self.bug == "ln-eps" else 1e-5
        x = x + FlaxAttention(self.bug, name="attn")(nn.LayerNorm(epsilon=eps, name="ln1")(x))
        return x + FlaxMLP(self.bug, name="mlp")(nn.LayerNorm(epsilon=eps, name="ln2")(x))


class FlaxGPT(nn.Module):
    bug: str = ""

    @nn.compact
    def __call__(self, ids):
        tok = nn.Embed(V, D, name="tok")
        x = tok(ids) + nn.Embed(T, D, name="pos")(jnp.arange(ids.shape[1]))
        for i in range(L):
            x = FlaxBlock(self.bug, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-6 if self.bug == "ln-eps" else 1e-5, name="ln_f")(x)
        # the tied head: torch's lm_head is a Linear under autocast; the op table does the same
        return under_table(lambda h, e: h @ e.T, x, tok.embedding)


def uncast_precision():
    """A dualprec_jax Precision whose ``apply`` returns the model's output as the model
    computed it (the compute dtype under a mixed policy), skipping the output cast: the
    "output not cast" bug, planted in the JAX side's training code rather than the model."""
    from dualprec_jax import Precision

    class UncastPrecision(Precision):
        def apply(self, *args, **kwargs):  # the cast functions themselves stay correct
            self.convert_output = lambda tree: tree
            try:
                return super().apply(*args, **kwargs)
            finally:
                del self.convert_output

    return UncastPrecision


def data(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (batch, T + 1))
    return ids[:, :-1], ids[:, 1:]
