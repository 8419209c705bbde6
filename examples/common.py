"""What the example scripts share: the synthetic task, the initial weights and the argument parser.

Everything is NumPy so that the torch and the Flax script start from the same numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = (16, 64, 64, 1)  # in -> hidden -> hidden -> out


def task(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of a smooth regression problem, float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0])).astype(np.float32)
    w = rng.standard_normal((SIZES[0], 1)).astype(np.float32) / np.sqrt(SIZES[0])
    y = np.sin(2.0 * x @ w).astype(np.float32)
    return x, y


def initial_weights(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias [out]) per layer: torch's nn.Linear layout."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        layers.append((rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32),
                       rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)))
    return layers


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--policy-file", default=str(HERE / "policy.toml"), help="TOML file with the policy")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--losses", help="write the per-step losses to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args()


def batches(x: np.ndarray, y: np.ndarray, batch: int, steps: int):
    for step in range(steps):
        i = (step * batch) % len(x)
        yield x[i:i + batch], y[i:i + batch]


def write_losses(path: str | None, framework: str, policy: str, losses: list[float]) -> None:
    if path:
        Path(path).write_text(json.dumps({"framework": framework, "policy": policy, "losses": losses}))


def progress(quiet: bool):
    """A rich progress bar (or a silent stand-in) with the loss in its description."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), disable=quiet)
