"""CPU step time through dualprec_torch.Precision against the hand-written torch.autocast
(+ GradScaler) loop: same model, same run, alternating rounds.  Target: ratio <= 1.02.

    python bench/bench_torch_precision.py [--quick]

Writes bench/results/<date>-<machine>-torch-precision.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

# the repository root first: an editable install made before dualprec_torch/__init__.py
# existed maps it as a namespace package
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from gpu_torch import measure_pair_stats  # noqa: E402

SIZES = dict(d=256, hidden=1024, blocks=4, tokens=512)
# a model so small that Python overhead is most of its step: the wrapper's cost in microseconds
TINY = dict(d=16, hidden=32, blocks=4, tokens=8)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test, not a figure)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, steps = (3, 2) if args.quick else (101, 1)
    rows = {}
    load_before = os.getloadavg()[0]
    for policy in ("bf16-mixed", "16-mixed"):
        m = measure_pair_stats(policy, steps=steps, warmup=3, rounds=rounds, device="cpu", **SIZES)
        rows[policy] = {"hand_ms": m["hand_s"] * 1e3, "precision_ms": m["precision_s"] * 1e3,
                        "ratio": m["ratio"], "ratio_of_min_times": m["ratio_min_times"]}
        tiny = measure_pair_stats(policy, steps=50, warmup=5, rounds=rounds, device="cpu", **TINY)
        rows[policy]["wrapper_overhead_us"] = (tiny["precision_s"] - tiny["hand_s"]) * 1e6
    machine = platform.node().split(".")[0] or "cpu"
    result = {"benchmark": "torch-precision-cpu", "date": datetime.date.today().isoformat(),
              "machine": machine, "processor": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "sizes": SIZES, "tiny_sizes_for_overhead": TINY, "rounds": rounds, "steps_per_round": steps, "clock": "process CPU time (1 thread)",
              "statistic": "ratio: median over rounds of (Precision / hand-written), each round's pair "
                           "back to back; ms: median per-step time",
              "target_ratio": 1.02,
              # the machine is shared: its load says how much to trust a 1-2% difference
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "results": rows}
    if not args.quick:
        out = Path(__file__).resolve().parent / "results" / f"{result['date']}-{machine}-torch-precision.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["written_to"] = str(out)
    _table(result)
    return result


def _table(result):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Precision vs hand-written, CPU ({result['threads']} thread, torch {result['torch']})")
    for col in ("policy", "hand-written ms/step", "Precision ms/step", "ratio", "ratio of min times",
                "wrapper overhead us/step"):
        table.add_column(col, justify="right")
    for policy, r in result["results"].items():
        ok = "green" if r["ratio"] <= result["target_ratio"] else "red"
        table.add_row(policy, f"{r['hand_ms']:.2f}", f"{r['precision_ms']:.2f}", f"[{ok}]{r['ratio']:.3f}[/]",
                      f"{r['ratio_of_min_times']:.3f}", f"{r['wrapper_overhead_us']:.0f}")
    Console().print(table)
    if "written_to" in result:
        Console().print(f"written to {result['written_to']}")


if __name__ == "__main__":
    main()
