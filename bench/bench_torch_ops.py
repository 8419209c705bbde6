"""The CPU cost of CUDA autocast's op table in dualprec_torch, against plain CPU autocast in the
same run.  Target: a training step within 1.02 of plain ``torch.autocast("cpu")``.

    python bench/bench_torch_ops.py [--quick] [--parts calls,mlp,transformer] [--rounds N]

Parts (each timed in interleaved rounds, the order of the variants rotating every round):

- ``calls``: one call of exp, softmax, layer_norm, pow and sum on a bfloat16 8 x 16 x 64 tensor,
  per call (blocks of ``--calls`` calls).
- ``mlp``: a training step (AdamW) of an elementwise-heavy MLP: 8 blocks of width 64 on 32
  rows, each a Linear followed by layer_norm, softmax, exp, pow and sum of its half output and
  a few unlisted elementwise ops.
- ``transformer``: a training step of 8 pre-norm blocks of width 64 with hand-written attention
  (the earlier row of this bench).

Variants:

- "cpu autocast": plain ``torch.autocast("cpu")``, with dualprec's kernels *not* registered
  (what a user without dualprec runs).  It computes the float32-list ops in bfloat16/float16,
  so against it the ratio mixes the mechanism's cost with a different arithmetic.
- "hand cuda table": plain CPU autocast with the CUDA table's float32 casts written into the
  model (``x.float()`` before each float32-list op), kernels not registered: Precision's
  arithmetic, so the ratio against it is the mechanism's own cost.
- "precision c++" / "precision c++ boxed" / "precision python": `Precision` with the C++
  kernels (the default: unboxed for the common float32-list ops, boxed for the rest), with the
  generic boxed C++ kernel for every op, or with the Python kernels
  (`dualprec_torch.ops.KERNELS_ENV`).
- steps only, "hand + c++ kernels": the "cpu autocast" loop inside ``ops.cpu_table()`` (the
  C++ kernels under CUDA's rule, without Precision's step): the kernels' share of Precision's cost.
- ``calls`` only, "cpu autocast + kernels": plain CPU autocast in a process where the C++
  kernels are registered (outside Precision they redispatch): what dualprec costs other code.

Statistics: per variant the median per-call or per-step process CPU time over rounds, with its
min and max; per ratio the median over rounds of (variant / baseline) within the same round,
with min and max.  Writes bench/results/<date>-<machine>-torch-ops.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

TRANSFORMER = dict(width=64, blocks=8, heads=4, batch=8, tokens=16)
MLP = dict(width=64, blocks=8, rows=32)
CALL_SHAPE = (8, 16, 64)
POLICIES = ("bf16-mixed", "16-mixed")
ident = lambda t: t
upcast = lambda t: t.float()


# ----- models --------------------------------------------------------------------------------
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


class ElementwiseBlock(nn.Module):
    """A Linear, then the float32-list ops exp, softmax, layer_norm, pow and sum, each on the
    Linear's half-precision output, and unlisted elementwise ops joining them."""

    def __init__(self, d, up):
        super().__init__()
        self.up = up
        self.fc, self.ln = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.fc(x)
        a = F.layer_norm(self.up(h), h.shape[-1:], self.ln.weight, self.ln.bias)
        s = torch.softmax(self.up(h), dim=-1)
        e = torch.exp(self.up(torch.tanh(h)))
        r = self.up(h).pow(2).sum(-1, keepdim=True)
        return x + F.gelu(a) * s + 0.01 * e - 1e-3 * r


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build(model: str, up=ident):
    """(model, AdamW, input) of one of the step parts, seeded."""
    torch.manual_seed(0)
    if model == "mlp":
        net = Stack(ElementwiseBlock(MLP["width"], up) for _ in range(MLP["blocks"]))
        x = torch.randn(MLP["rows"], MLP["width"])
    else:
        s = TRANSFORMER
        net = Stack(Block(s["width"], s["heads"], up) for _ in range(s["blocks"]))
        x = torch.randn(s["batch"], s["tokens"], s["width"])
    return net, torch.optim.AdamW(net.parameters(), lr=1e-4), x


# ----- the variants ----------------------------------------------------------------------------
def activate(variant: str) -> None:
    """Register the kernels a variant runs with (none for the plain baselines)."""
    from dualprec_torch import ops

    if variant in ("cpu autocast", "hand cuda table"):
        ops.uninstall_cpu_table()
    else:
        ops.install_cpu_table("python" if variant.endswith("python") else "c++", fast=not variant.endswith("boxed"))


def step_functions(policy: str, model: str) -> dict:
    """variant -> zero-argument training step (each with its own model and optimizer)."""
    from dualprec import Policy
    from dualprec_torch import Precision, ops
    from dualprec_torch.casts import torch_dtype

    p = Policy.parse(policy)
    dtype = torch_dtype(p.compute_dtype)

    def hand_loop(up, table=False):
        net, opt, x = build(model, up)
        scaler = torch.amp.GradScaler("cpu") if p.loss_scale.enabled else None

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype), (ops.cpu_table() if table else contextlib.nullcontext()):
                loss = net(x).float().pow(2).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return step

    def precision_loop():
        net, opt, x = build(model)
        prec = Precision(p, device="cpu")
        net, opt = prec.setup(net, opt)

        def step():
            opt.zero_grad(set_to_none=True)
            with prec.autocast():
                loss = net(x).float().pow(2).mean()
            prec.backward(loss)
            prec.step(opt)
            prec.update()
        return step

    return {"cpu autocast": hand_loop(ident), "hand cuda table": hand_loop(upcast),
            "hand + c++ kernels": hand_loop(ident, table=True),
            "precision c++": precision_loop(), "precision c++ boxed": precision_loop(),
            "precision python": precision_loop()}


CALLS = {
    "exp": lambda x, up: torch.exp(up(x)),
    "softmax": lambda x, up: torch.softmax(up(x), dim=-1),
    "layer_norm": lambda x, up: F.layer_norm(up(x), x.shape[-1:]),
    "pow": lambda x, up: torch.pow(up(x), 2),
    "sum": lambda x, up: torch.sum(up(x), dim=-1),
}


def call_functions(policy: str, op: str, n: int) -> dict:
    """variant -> a function making ``n`` calls of ``op`` on a half tensor."""
    from dualprec import Policy
    from dualprec_torch import Precision
    from dualprec_torch.casts import torch_dtype

    p = Policy.parse(policy)
    dtype = torch_dtype(p.compute_dtype)
    x = torch.randn(*CALL_SHAPE).to(dtype)
    f = CALLS[op]

    def plain(up):
        def calls():
            with torch.autocast("cpu", dtype=dtype):
                for _ in range(n):
                    f(x, up)
        return calls

    prec = Precision(p, device="cpu")

    def precision():
        with prec.autocast():
            for _ in range(n):
                f(x, ident)

    return {"cpu autocast": plain(ident), "hand cuda table": plain(upcast), "cpu autocast + kernels": plain(ident),
            "precision c++": precision, "precision c++ boxed": precision, "precision python": precision}


# ----- timing ------------------------------------------------------------------------------------
def interleaved(fns: dict, *, rounds: int, repeat: int, per: int, warmup: int = 2) -> dict:
    """variant -> per-unit times, one per round (``repeat`` calls of the function per sample,
    ``per`` units per call); variants take turns in an order rotating every round, each with
    its kernels registered (`activate`) and one untimed call before its block."""
    names = list(fns)
    for name in names:
        activate(name)
        for _ in range(warmup):
            fns[name]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            activate(name)
            fns[name]()  # untimed: the first call after kernels are (re)registered runs cold
            t0 = time.process_time()
            for _ in range(repeat):
                fns[name]()
            times[name].append((time.process_time() - t0) / (repeat * per))
    activate("precision c++")
    return times


def summarize(times: dict, baselines=("cpu autocast", "hand cuda table"), scale=1e6, unit="us") -> dict:
    out = {}
    for name, v in times.items():
        out[name] = {f"median_{unit}": statistics.median(v) * scale, f"min_{unit}": min(v) * scale,
                     f"max_{unit}": max(v) * scale}
        for base in baselines:
            if name != base:
                ratios = [a / b for a, b in zip(v, times[base])]
                key = f"vs_{base.replace(' ', '_')}"
                out[name][key] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    from bench.harness import cpu_environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, nothing written (a smoke test, not a figure)")
    ap.add_argument("--parts", default="calls,mlp,transformer")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--steps", type=int, default=5, help="training steps per variant per round")
    ap.add_argument("--calls", type=int, default=200, help="calls per variant per round (calls part)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results file (default bench/results/<date>-<machine>-torch-ops.json)")
    args = ap.parse_args(argv)
    rounds, steps, calls = (3, 1, 20) if args.quick else (args.rounds, args.steps, args.calls)
    env = cpu_environment(threads=args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    results: dict = {}
    for policy in policies:
        row = results.setdefault(policy, {})
        if "calls" in parts:
            row["calls"] = {op: summarize(interleaved(call_functions(policy, op, calls), rounds=rounds, repeat=1,
                                                      per=calls)) for op in CALLS}
        for model in ("mlp", "transformer"):
            if model in parts:
                row[model] = summarize(interleaved(step_functions(policy, model), rounds=rounds, repeat=steps,
                                                   per=steps), scale=1e3, unit="ms")
    result = {"benchmark": "torch-ops-cpu", "cpu_model": cpu_model(), **env, "rounds": rounds,
              "steps_per_round": steps, "calls_per_round": calls, "call_shape": list(CALL_SHAPE),
              "mlp": MLP, "transformer": TRANSFORMER, "clock": "process CPU time",
              "statistic": "per variant: median (min, max) over rounds of the per-call or per-step time; "
                           "vs_X: median (min, max) over rounds of variant / X timed in the same round",
              "target_ratio_vs_cpu_autocast_per_step": 1.02, "load_average_after": list(__import__("os").getloadavg()),
              "results": results}
    if not args.quick:
        out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                               / f"{env['date']}-{env['machine']}-torch-ops.json")
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["written_to"] = str(out)
    print_table(result)
    return result


def print_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    def cell(r, key):
        return f"{r[key]['median']:.3f} ({r[key]['min']:.2f}-{r[key]['max']:.2f})" if key in r else ""

    console = Console()
    for policy, row in result["results"].items():
        table = Table(title=f"{policy}: CUDA op table on CPU vs plain CPU autocast ({result['torch_threads']} thread, "
                            f"{result['rounds']} rounds, {result['cpu_model']})")
        for col in ("part", "variant", "median", "vs cpu autocast", "vs hand cuda table"):
            table.add_column(col, justify="right")
        entries = [(f"{op} call", v) for op, v in row.get("calls", {}).items()]
        entries += [(f"{m} step", row[m]) for m in ("mlp", "transformer") if m in row]
        for part, variants in entries:
            for name, r in variants.items():
                unit = "us" if "median_us" in r else "ms"
                table.add_row(part, name, f"{r[f'median_{unit}']:.2f} {unit}", cell(r, "vs_cpu_autocast"),
                              cell(r, "vs_hand_cuda_table"))
        console.print(table)
    if "written_to" in result:
        console.print(f"written to {result['written_to']}")


if __name__ == "__main__":
    main()
