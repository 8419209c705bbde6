"""CPU step time of a training step through dualprec_jax.Precision against the same model
written by hand (Flax dtype/param_dtype knobs + a jmp loss-scale loop), in the same run,
after compilation; compile times reported separately.  Target: ratio <= 1.02.

Writes bench/results/<date>-<machine>-jax-precision.json and prints a rich table.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_jax import measure  # noqa: E402  (same workload code as the GPU script)

SIZES = dict(d_model=256, d_hidden=1024, blocks=2, tokens=512, steps=10, warmup=2, repeats=7)


def main() -> dict:
    from rich.console import Console
    from rich.table import Table

    runs = [measure(policy=p, **SIZES) for p in ("bf16-mixed", "16-mixed")]
    table = Table(title=f"dualprec_jax Precision vs hand-written Flax + jmp ({platform.node()}, CPU)")
    for col in ("policy", "hand step ms", "Precision step ms", "ratio", "hand compile s", "Precision compile s"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r["policy"], f"{r['hand']['step_s'] * 1e3:.2f}", f"{r['precision']['step_s'] * 1e3:.2f}",
                      f"{r['ratio_precision_over_hand']:.3f}", f"{r['hand']['compile_s']:.2f}",
                      f"{r['precision']['compile_s']:.2f}")
    Console().print(table)
    result = {"bench": "jax-precision", "date": datetime.date.today().isoformat(), "machine": platform.node(),
              "python": platform.python_version(), "sizes": SIZES, "target_ratio": 1.02, "runs": runs,
              "note": "step_s is the best of `repeats` interleaved rounds of `steps` steps"}
    out = Path(__file__).resolve().parent / "results" / f"{result['date']}-{platform.node()}-jax-precision.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
