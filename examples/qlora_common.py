"""What the two QLoRA examples share: the policy, the adapter's rank and initial numbers, the
held-out batch the forwards are compared on, and the checkpoint's key names.

The frozen base is the example MLP of common.py (its NumPy weights, quantized to NF4 by each
backend: the same bits); the adapter is peft's LoRA on every linear layer: ``lora_A`` [r, in]
kaiming-uniform, ``lora_B`` [out, r] zeros, added as ``(x @ A.T) @ B.T * alpha / r``."""

from __future__ import annotations

import argparse

import numpy as np
from common import SIZES, task

POLICY = "bf16-mixed,quant=nf4"  # float32 params, bfloat16 compute, NF4 base weights
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
LAYERS = tuple(f"dense_{i}" for i in range(len(SIZES) - 1))  # the module names in both backends
EVAL_KEY = "eval.output"  # the torch forward on eval_batch(), stored with the checkpoint


def adapter_init(seed: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (lora_A [r, in], lora_B [out, r])}`` in peft's layout, float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, fan_in, fan_out in zip(LAYERS, SIZES[:-1], SIZES[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        out[name] = (rng.uniform(-bound, bound, (RANK, fan_in)).astype(np.float32),
                     np.zeros((fan_out, RANK), np.float32))
    return out


def fine_tune_task(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The regression of common.task on other samples: what the adapter learns."""
    return task(n, seed=3)


def eval_batch() -> np.ndarray:
    """Held-out inputs (float32) on which both backends' forwards are compared."""
    return task(32, seed=4)[0]


def parse_args(description: str, flax: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--policy", default=POLICY, help="dualprec policy string (must quantize)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--losses", help="write the per-step losses (and forward checks) to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if flax:
        parser.add_argument("--from-torch", metavar="PATH",
                            help="start from the checkpoint qlora_torch.py saved (base + adapter)")
    else:
        parser.add_argument("--save", default="qlora_torch.safetensors",
                            help="where to write the quantized base + adapter (safetensors)")
    return parser.parse_args()
