"""Run train_torch.py and train_flax.py on the same policy file and plot both loss curves.

    python examples/compare_frameworks.py [--policy-file examples/policy.toml] [--steps 200] [--out losses.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, policy_file: str, steps: int, out: Path) -> dict:
    subprocess.run([sys.executable, str(HERE / script), "--policy-file", policy_file, "--steps", str(steps),
                    "--losses", str(out), "--quiet"], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy-file", default=str(HERE / "policy.toml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="losses.png", help="the figure (PNG)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(s, args.policy_file, args.steps, Path(tmp) / f"{s}.json")
                for s in ("train_torch.py", "train_flax.py")]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, style in zip(runs, ("-", "--")):
        ax.plot(r["losses"], style, label=f"{r['framework']} ({r['policy']})")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    ax.set_title("The same policy file in PyTorch and in Flax")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    gap = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(runs[0]["losses"], runs[1]["losses"]))
    print(f"wrote {args.out}; largest relative gap between the two loss curves: {gap:.3g}")


if __name__ == "__main__":
    main()
