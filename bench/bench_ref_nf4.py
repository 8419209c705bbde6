"""NF4 quantize throughput: dualprec.ref (NumPy) vs bitsandbytes' CPU quantize_4bit.

Run: python bench/bench_ref_nf4.py [--numel N] [--repeats R]
Writes bench/results/ref_nf4_<date>_<machine>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dualprec.ref import quantize_4bit  # noqa: E402


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and torch.compile / allocator first-touch effects)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--numel", type=int, default=64 * 2**20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocksize", type=int, default=64)
    args = ap.parse_args()

    import bitsandbytes.functional as bnbF
    import torch
    from rich.console import Console
    from rich.table import Table

    x = np.random.default_rng(0).standard_normal(args.numel, dtype=np.float32)
    xt = torch.from_numpy(x)
    ref_packed, ref_state = quantize_4bit(x, "nf4", args.blocksize)
    bnb_packed, bnb_state = bnbF.quantize_4bit(xt, blocksize=args.blocksize, quant_type="nf4")
    identical = bool(np.array_equal(ref_packed, bnb_packed.numpy())
                     and np.array_equal(ref_state.absmax, bnb_state.absmax.numpy()))

    ref_s = _best_seconds(lambda: quantize_4bit(x, "nf4", args.blocksize), args.repeats)
    bnb_s = _best_seconds(lambda: bnbF.quantize_4bit(xt, blocksize=args.blocksize, quant_type="nf4"), args.repeats)
    result = {
        "benchmark": "nf4_quantize_fp32",
        "numel": args.numel,
        "blocksize": args.blocksize,
        "repeats": args.repeats,
        "ref_seconds": ref_s,
        "bnb_seconds": bnb_s,
        "ref_melem_per_s": args.numel / ref_s / 1e6,
        "bnb_melem_per_s": args.numel / bnb_s / 1e6,
        "ratio_ref_over_bnb": bnb_s / ref_s,
        "target_ratio": 0.5,
        "bit_identical": identical,
        "machine": {"host": socket.gethostname(), "platform": platform.platform(),
                    "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "versions": {"numpy": np.__version__, "torch": torch.__version__,
                     "bitsandbytes": __import__("bitsandbytes").__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out_dir / f"ref_nf4_{stamp}_{socket.gethostname()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"NF4 quantize, {args.numel:,} fp32 values, blocksize {args.blocksize}")
    for col in ("implementation", "best s", "M values/s"):
        table.add_column(col, justify="right")
    table.add_row("dualprec.ref (NumPy)", f"{ref_s:.3f}", f"{result['ref_melem_per_s']:.1f}")
    table.add_row("bitsandbytes CPU", f"{bnb_s:.3f}", f"{result['bnb_melem_per_s']:.1f}")
    console = Console()
    console.print(table)
    verdict = "meets" if result["ratio_ref_over_bnb"] >= 0.5 else "MISSES"
    console.print(f"ref/bnb throughput {result['ratio_ref_over_bnb']:.2f}x ({verdict} the 0.5x target); "
                  f"bit-identical: {identical}; written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
