"""A model seeded with three known-fragile modules (twins in fragile_flax.py, same names):

* ``scores``: attention whose logits carry a large constant offset (7e4, as an additive
  bias or mask value would): in float32 the softmax is shift-invariant and the offset
  changes nothing; in float16 the logits overflow (inf, and the softmax of inf - inf is
  NaN); in bfloat16 they round to multiples of 512 and the softmax flattens to uniform;
* ``norm``: a hand-written LayerNorm (mean, variance, sqrt: ops on no autocast list, so
  they run in the compute dtype) fed by its own projection (weights of gain 1000, so
  activations of several hundred): the squared deviations overflow float16 (inf variance,
  a zero output);
* ``outlier``: a linear layer whose input column 0 has weights of 5e4 (the others ~0.1; fed
  by a quiet channel, scaled by 2e-5): its NF4 blocks and its per-tensor FP8 scale are set
  by the outliers, and the other weights round to zero or into subnormals.

``embed`` and ``head`` are ordinary linear layers.  ``dualprec diagnose --model fragile``
should rank the seeded modules first under 16-mixed (scores, norm), nf4 and FP8 (outlier,
scores).
"""

from __future__ import annotations

import torch
from torch import nn

#: the seeded scales (module constants shared with the Flax twin's docs)
LOGIT_OFFSET, NORM_GAIN, OUTLIER, QUIET = 7.0e4, 1000.0, 5.0e4, 2.0e-5


class SharpAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        q = self.q(x)
        s = torch.matmul(q, self.k(x).transpose(-1, -2)) * q.shape[-1] ** -0.5 + LOGIT_OFFSET
        p = torch.softmax(s, dim=-1)
        return torch.matmul(p, self.v(x))


class HugeNorm(nn.Module):
    """A projection (a raw weight, not a child module: the overflow happens inside this
    module whatever dtype a neighbour hands back) into activations of several hundred, then
    LayerNorm written out (mean, squared deviation, mean, sqrt)."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(d, d) * (NORM_GAIN / d ** 0.5))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = torch.matmul(x, self.proj_weight.t())
        mu = h.mean(-1, keepdim=True)
        dev = h - mu
        var = (dev * dev).mean(-1, keepdim=True)
        return dev / torch.sqrt(var + self.eps) * self.weight + self.bias


class Fragile(nn.Module):
    def __init__(self, d_in=16, d=32, n_out=8):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.scores = SharpAttention(d)
        self.norm = HugeNorm(d)
        self.outlier = nn.Linear(d, d)
        self.head = nn.Linear(d, n_out)
        with torch.no_grad():
            self.outlier.weight[:, 0] = OUTLIER * torch.sign(self.outlier.weight[:, 0])
        self.register_buffer("quiet", torch.tensor([QUIET] + [1.0] * (d - 1)), persistent=False)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.scores(h)
        h = self.norm(h)
        h = h + self.outlier(h * self.quiet)
        return self.head(h.mean(dim=1))
