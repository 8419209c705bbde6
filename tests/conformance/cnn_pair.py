"""A small CNN written once in each framework, as a user would, not in the zoo: two stages
of 3x3 convolution + GroupNorm + GELU (the second with stride 2), global average pooling and
a linear head; input [8, 3, 16, 16] (NCHW in torch, NHWC in Flax).  ``FlaxCNN(bug=...)``
plants one twin bug for the power tests (:data:`BUGS`)."""

from __future__ import annotations

import flax.linen as nn
import numpy as np
import torch
import torch.nn.functional as F
from gpt_pair import HalfAccDense, gelu

from conformance.zoo.flax_models import avg_pool

C_IN, C1, C2, GROUPS, N_CLASSES, HW, BATCH = 3, 16, 32, 4, 10, 16, 8

BUGS = {
    "gelu-tanh": "tanh-approximated GELU (torch: exact erf)",
    "gn-eps": "GroupNorm eps 1e-6 (torch: 1e-5)",
    "accum-half": "head.fc's GEMM accumulated in the compute dtype (no float32 accumulator)",
    "padding": "the stride-2 conv padded SAME, (0, 1) (torch: padding=1, (1, 1))",
    "output-uncast": "the output returned in the compute dtype (the output cast skipped)",
}


class TorchStage(torch.nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = torch.nn.GroupNorm(GROUPS, c_out)

    def forward(self, x):
        return F.gelu(self.norm(self.conv(x)))


class TorchHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(C2, N_CLASSES)

    def forward(self, x):
        return self.fc(F.avg_pool2d(x, x.shape[-1]).flatten(1))


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.s1 = TorchStage(C_IN, C1, 1)
        self.s2 = TorchStage(C1, C2, 2)
        self.head = TorchHead()

    def forward(self, x):
        return self.head(self.s2(self.s1(x)))


class FlaxStage(nn.Module):
    features: int
    stride: int
    bug: str = ""

    @nn.compact
    def __call__(self, x):
        pad = "SAME" if self.bug == "padding" and self.stride == 2 else ((1, 1), (1, 1))
        x = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding=pad, name="conv")(x)
        # torch's group_norm subtracts the mean before squaring (no E[x^2] - E[x]^2)
        x = nn.GroupNorm(GROUPS, epsilon=1e-6 if self.bug == "gn-eps" else 1e-5, use_fast_variance=False,
                         name="norm")(x)
        return gelu(x, approximate=self.bug == "gelu-tanh")


class FlaxHead(nn.Module):
    bug: str = ""

    @nn.compact
    def __call__(self, x):
        x = avg_pool(x, x.shape[1:3]).reshape(x.shape[0], -1)  # torch's avg_pool2d: float32 sums
        if self.bug == "accum-half":
            return HalfAccDense(N_CLASSES, name="fc")(x)
        return nn.Dense(N_CLASSES, name="fc")(x)


class FlaxCNN(nn.Module):
    bug: str = ""

    @nn.compact
    def __call__(self, x):
        x = FlaxStage(C1, 1, self.bug, name="s1")(x)
        x = FlaxStage(C2, 2, self.bug, name="s2")(x)
        return FlaxHead(self.bug, name="head")(x)


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, C_IN, HW, HW)).astype(np.float32)
    return x, rng.integers(0, N_CLASSES, BATCH)
