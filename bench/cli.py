"""The benchmark command line: `python -m bench ...` or `dualprec bench ...`.

    python -m bench list                                   # workloads and policy rows
    python -m bench run --workload mlp-cpu                 # every policy, both backends
    python -m bench run --policies bf16-mixed,16-mixed --backends torch --memory
    python -m bench plot bench/results/<file>.json         # PNG + Markdown snippet
    python -m bench theory                                 # the bytes/param table
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    from .workloads import POLICIES, WORKLOADS

    parser = argparse.ArgumentParser(prog=prog, description="Benchmark dualprec policies in torch and JAX.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="the workloads and policy rows")
    sub.add_parser("theory", help="the theoretical bytes per parameter table (Markdown)")

    run = sub.add_parser("run", help="time a workload under policies, write JSON + a table")
    run.add_argument("--workload", default="mlp-cpu", choices=sorted(WORKLOADS))
    run.add_argument("--policies", type=_csv, default=[r.label for r in POLICIES],
                     help="comma-separated policy rows (default: all)")
    run.add_argument("--backends", type=_csv, default=["torch", "jax"])
    run.add_argument("--impls", type=_csv, default=["hand", "dualprec"])
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--compiled", action="store_true", help="also time torch.compile'd steps")
    run.add_argument("--memory", action="store_true", help="also measure bytes per parameter")
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--steps", type=int, default=3, help="timed steps per round")
    run.add_argument("--budget", type=float, default=600.0, help="wall-clock budget in seconds")
    run.add_argument("--name", default=None, help="results file name part (default: the workload)")
    run.add_argument("--out-dir", default=None, help="default: ./bench-results (bench/results from the dualprec "
                     "checkout's root)")

    plot = sub.add_parser("plot", help="README table and figure from results JSON")
    plot.add_argument("files", nargs="+")
    plot.add_argument("--out-dir", default=None, help="default: next to the first file")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    """``prog``: the command name in usage lines (`dualprec bench` passes its own)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # `python -m bench --workload ...` means run
    args = _build_parser(prog).parse_args(argv)
    try:
        return {"list": _list, "theory": _theory, "run": _run, "plot": _plot}[args.command](args)
    except KeyError as e:
        print(f"bench: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


def _list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .workloads import POLICIES, WORKLOADS

    console = Console()
    t = Table(title="workloads")
    for col in ("name", "d_model", "d_hidden", "blocks", "tokens", "params", "train GFLOP/step"):
        t.add_column(col)
    for w in WORKLOADS.values():
        t.add_row(w.name, str(w.d_model), str(w.d_hidden), str(w.n_blocks), str(w.tokens), f"{w.params:,}",
                  f"{w.train_flops() / 1e9:.1f}")
    console.print(t)
    from dualprec.cli import terminal_width, wrap, wrap_policy

    width = terminal_width()
    lines = ["policy rows (label, policy, whether dualprec runs it):"]
    for r in POLICIES:
        lines += wrap_policy(f"{r.label}: {r.canonical()}", width, "  ", "      ")
        lines += wrap(f"dualprec: {r.not_implemented or 'yes'}", width, "      ", "        ")
    print("\n".join(lines))
    return 0


def _theory(args) -> int:
    from .memory import theory_markdown
    print(theory_markdown())
    return 0


def _default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _run(args) -> int:
    from rich.console import Console

    from .harness import BudgetGuard, ResultsFile, Row, environment, reasons, results_path, rich_table, run_rows
    from .memory import memory_record
    from .workloads import WORKLOADS, policy_records, policy_row

    for label in args.policies:
        policy_row(label)  # a typo fails here, before anything is timed
    bad = set(args.backends) - {"torch", "jax"}
    if bad:
        raise KeyError(f"unknown backend(s) {sorted(bad)}; use torch and/or jax")
    cfg = WORKLOADS[args.workload]
    device = args.device or _default_device()
    env = environment()
    path = results_path(args.name or cfg.name, env, args.out_dir)
    results = ResultsFile(path, name=args.name or cfg.name, env=env, meta={"argv": sys.argv, "workload": cfg.name})
    timing = dict(warmup=args.warmup, rounds=args.rounds, steps_per_round=args.steps)
    rows = []
    for backend in args.backends:
        for label in args.policies:
            rows.append(Row(f"{backend} {label}", _bind(policy_records, cfg, backend, label, impls=tuple(args.impls),
                                                          device=device, **timing), estimate_s=1.0))
            if args.compiled and backend == "torch":
                rows.append(Row(f"{backend} {label} compiled",
                                _bind(policy_records, cfg, backend, label, impls=tuple(args.impls), device=device,
                                      compiled=True, **timing), estimate_s=30.0, optional=True))
    if args.memory:
        for backend in args.backends:
            for label in args.policies:
                rows.append(Row(f"memory {backend} {label}",
                                _bind(lambda *a, **k: [memory_record(*a, **k)], cfg, backend, label, device=device),
                                estimate_s=1.0))
    records = run_rows(rows, BudgetGuard(args.budget), results)
    console = Console()
    console.print(rich_table(records, title=f"{cfg.name} on {env['machine']} ({env['date']})"))
    for line in reasons(records):
        console.print(f"  {line}", highlight=False)
    print(f"wrote {path}")
    return 0 if all(r.status in ("ok", "not implemented") for r in records) else 1


def _bind(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def _plot(args) -> int:
    from .plot import write_report

    outputs = write_report(args.files, out_dir=args.out_dir)
    for p in outputs:
        print(f"wrote {p}")
    return 0
