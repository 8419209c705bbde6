"""CPU step time of an op-heavy model through dualprec_torch.Precision (CUDA autocast's op
table emulated on CPU) against hand-written CPU autocast loops.  Target: ratio <= 1.02.

    python bench/bench_torch_ops.py [--quick]

The model: 8 pre-norm blocks of width 64 (LayerNorm, hand-written attention with softmax,
LayerNorm, GELU MLP; ~15 ops per block), a batch of 8 x 16 tokens, AdamW, GradScaler for
16-mixed.  Two hand-written baselines, timed in the same alternating rounds:

- "cpu autocast": plain ``torch.autocast("cpu")`` on the same model.  It computes
  layer_norm and softmax in bfloat16/float16, where Precision (like CUDA autocast) uses
  float32, so the ratio mixes the mechanism's cost with a different arithmetic.
- "hand cuda table": ``torch.autocast("cpu")`` with the CUDA table's float32 casts written
  into the model (``F.layer_norm(x.float(), ...)``, ``softmax(s.float())``): the same
  arithmetic as Precision, so this ratio is the cost of the mechanism alone.

Writes bench/results/<date>-<machine>-torch-ops.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

SIZES = dict(width=64, blocks=8, heads=4, batch=8, tokens=16)


class Block(nn.Module):
    """Pre-norm transformer block, attention written op by op.  ``up`` is where the
    hand-written CUDA-table baseline puts its float32 casts (identity otherwise)."""

    def __init__(self, d, heads, up):
        super().__init__()
        self.heads, self.up = heads, up
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = F.layer_norm(self.up(x), (d,), self.ln1.weight, self.ln1.bias)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(self.up(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5), dim=-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(b, t, d))
        h = F.layer_norm(self.up(x), (d,), self.ln2.weight, self.ln2.bias)
        return x + self.fc2(F.gelu(self.fc1(h)))


class Net(nn.Module):
    def __init__(self, width, blocks, heads, up=lambda t: t):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, up) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _build(sizes, up=lambda t: t):
    torch.manual_seed(0)
    model = Net(sizes["width"], sizes["blocks"], sizes["heads"], up)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def steps_for(policy: str, sizes=SIZES) -> dict:
    """name -> zero-argument training step, for the three loops."""
    from dualprec import Policy
    from dualprec_torch import Precision
    from dualprec_torch.casts import torch_dtype

    p = Policy.parse(policy)
    dtype = torch_dtype(p.compute_dtype)
    x = torch.randn(sizes["batch"], sizes["tokens"], sizes["width"])

    def hand_loop(up):
        model, opt = _build(sizes, up)
        scaler = torch.amp.GradScaler("cpu") if p.loss_scale.enabled else None

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype):
                loss = model(x).float().pow(2).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return step

    prec = Precision(p, device="cpu")
    model, opt = prec.setup(*_build(sizes))

    def precision_step():
        opt.zero_grad(set_to_none=True)
        with prec.autocast():
            loss = model(x).float().pow(2).mean()
        prec.backward(loss)
        prec.step(opt)
        prec.update()

    return {"cpu autocast": hand_loop(lambda t: t), "hand cuda table": hand_loop(lambda t: t.float()),
            "precision": precision_step}


def measure(policy: str, *, rounds: int, steps: int, warmup: int = 3, sizes=SIZES) -> dict:
    """Median per-step process CPU time of each loop over alternating rounds (the order
    rotates every round), and the median over rounds of Precision / each baseline."""
    fns = steps_for(policy, sizes)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.process_time()
            for _ in range(steps):
                fns[n]()
            times[n].append((time.process_time() - t0) / steps)

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    out = {f"{n}_ms": median(times[n]) * 1e3 for n in names}
    for base in ("cpu autocast", "hand cuda table"):
        out[f"ratio_vs_{base.replace(' ', '_')}"] = median([p / h for p, h in zip(times["precision"], times[base])])
        out[f"ratio_of_medians_vs_{base.replace(' ', '_')}"] = median(times["precision"]) / median(times[base])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test, not a figure)")
    ap.add_argument("--rounds", type=int, default=61)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, steps = (3, 1) if args.quick else (args.rounds, args.steps)
    load_before = os.getloadavg()[0]
    rows = {policy: measure(policy, rounds=rounds, steps=steps) for policy in ("bf16-mixed", "16-mixed")}
    machine = platform.node().split(".")[0] or "cpu"
    result = {"benchmark": "torch-ops-cpu", "date": datetime.date.today().isoformat(), "machine": machine,
              "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "threads": args.threads, "torch": torch.__version__, "sizes": SIZES, "rounds": rounds,
              "steps_per_round": steps, "clock": "process CPU time",
              "statistic": "ratio_vs_X: median over rounds of (Precision / X), each round's loops back to "
                           "back in rotating order; ratio_of_medians_vs_X: median Precision step time over "
                           "median X step time; ms: median per-step time",
              "target_ratio": 1.02,
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "results": rows}
    if not args.quick:
        out = Path(__file__).resolve().parent / "results" / f"{result['date']}-{machine}-torch-ops.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["written_to"] = str(out)
    _table(result)
    return result


def _table(result):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Precision (CUDA op table on CPU) vs hand-written CPU autocast "
                        f"({result['threads']} thread, torch {result['torch']})")
    for col in ("policy", "cpu autocast ms", "hand cuda table ms", "Precision ms", "ratio vs cpu autocast",
                "ratio vs hand cuda table"):
        table.add_column(col, justify="right")
    for policy, r in result["results"].items():
        table.add_row(policy, f"{r['cpu autocast_ms']:.2f}", f"{r['hand cuda table_ms']:.2f}",
                      f"{r['precision_ms']:.2f}", f"{r['ratio_of_medians_vs_cpu_autocast']:.3f}",
                      f"{r['ratio_of_medians_vs_hand_cuda_table']:.3f}")
    Console().print(table)
    if "written_to" in result:
        Console().print(f"written to {result['written_to']}")


if __name__ == "__main__":
    main()
