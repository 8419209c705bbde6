"""The model zoo in PyTorch.  Module names match the Flax twins in flax_models.py one to one,
so weights, gradients and per-layer activations can be paired by name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=32, n_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, n_out)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        return self.head(x)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = self.qkv(x).reshape(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, d, mult=4):
        super().__init__()
        self.fc1 = nn.Linear(d, mult * d)
        self.fc2 = nn.Linear(mult * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LayerNorm(x)), then x + mlp(RMSNorm(x)); a mean-pooled head."""

    def __init__(self, d=32, heads=4, n_out=8):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d, heads)
        self.ln2 = nn.RMSNorm(d, eps=1e-6)
        self.mlp = FeedForward(d)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


class CNN(nn.Module):
    """conv -> GroupNorm -> relu -> 2x2 avg pool, twice; global mean pool; linear head."""

    def __init__(self, c_in=3, n_out=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8, eps=1e-5)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, 16, eps=1e-5)
        self.head = nn.Linear(16, n_out)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.avg_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return self.head(x.mean(dim=(2, 3)))


class HandRMSNorm(nn.Module):
    """RMSNorm from pow/mean/rsqrt (not ``nn.RMSNorm``): under autocast pow and rsqrt are on
    the float32 list, so the norm runs in float32 and its output follows type promotion."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class HandAttention(Attention):
    """`Attention`'s layers with ``@`` and ``torch.softmax``; the head width is 16, so the
    score scale 1/4 is exact in every dtype (a Python scalar times a half tensor is formed in
    float32 by torch and weakly typed by JAX; an exact scale keeps that difference out)."""

    def forward(self, x):
        b, t, d = x.shape
        h, dh = self.heads, d // self.heads
        q, k, v = self.qkv(x).reshape(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * dh ** -0.5, dim=-1)
        return self.proj((probs @ v).transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc3 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class OpByOp(nn.Module):
    """A pre-norm block written op by op: x + attn(rms(x)), x + swiglu(rms(x)), a mean-pooled
    head.  Linear layers for the projections, everything else hand-written."""

    def __init__(self, d=32, heads=2, hidden=64, n_out=8):
        super().__init__()
        self.ln1 = HandRMSNorm(d)
        self.attn = HandAttention(d, heads)
        self.ln2 = HandRMSNorm(d)
        self.mlp = SwiGLU(d, hidden)
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


BUILDERS = {"mlp": MLP, "transformer": TransformerBlock, "cnn": CNN, "opbyop": OpByOp}


def build(name: str) -> nn.Module:
    return BUILDERS[name]()
