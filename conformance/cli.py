"""``dualprec conformance``: run the matrix, print a table, write a report, exit 1 on failure."""

from __future__ import annotations

import argparse
import sys
import time

from .records import dumps

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualprec conformance",
                                description="Run the same models under a policy in PyTorch and JAX and "
                                            "check they compute the same numbers.")
    p.add_argument("--policy", action="append", default=None,
                   help="a policy (preset, grammar string or combination label); repeatable; default: the matrix")
    p.add_argument("--model", action="append", default=None,
                   help="mlp, transformer, cnn or opbyop; repeatable")
    p.add_argument("--steps", type=int, default=3, help="training steps per trajectory (default 3)")
    p.add_argument("--seed", type=int, default=0,
                   help="weights and data seed (default 0)")
    p.add_argument("--full", action="store_true",
                   help="every policy on every model (the default matrix runs the transformer and CNN "
                        "under a few representative policies and float64 on the MLP only)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--report", metavar="DIR", help="write records.json, report.md and plots to DIR")
    p.add_argument("--failures-only", action="store_true", help="--verbose table: only failed records")
    p.add_argument("--verbose", "-v", action="store_true", help="print every record, not only the matrix")
    p.add_argument("--mutants", action="store_true",
                   help="mutation testing: inject each known precision bug, report the kill rate "
                        "(python -m conformance.mutants --help for its options)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--mutants" in argv:
        from . import mutants

        return mutants.main([a for a in argv if a != "--mutants"])
    args = build_parser().parse_args(argv)
    from dualprec import PolicyError

    from . import matrix
    from .zoo import MODELS

    try:
        policies = (matrix.default_policies() if not args.policy
                    else dict(matrix.resolve_policy(p) for p in args.policy))
        models = args.model or list(MODELS)
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; the zoo has {', '.join(MODELS)}")
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
    except (PolicyError, ValueError) as e:
        print(f"dualprec conformance: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    full = bool(args.full or args.policy or args.model)
    t0 = time.perf_counter()
    from .tolerances import MathModeMismatch

    try:
        records = _run(matrix, policies, models, args, full)
    except MathModeMismatch as e:
        print(f"dualprec conformance: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    seconds = time.perf_counter() - t0
    from .report import rich_table, summary_line, write_report  # noqa: F401

    if args.format == "json":
        print(dumps(records))
    else:
        from rich.console import Console

        from .report import failure_lines, matrix_table

        console = Console()
        if args.verbose or args.failures_only:
            shown = [r for r in records if r.failed] if args.failures_only else records
            console.print(rich_table(shown))
        console.print(matrix_table(records))
        for line in failure_lines(records, width=min(console.width, 80) - 1):
            console.print(line, markup=False, highlight=False, overflow="fold")
        console.print(summary_line(records, seconds))
    if args.report:
        path = write_report(records, args.report, seconds, argv)
        print(f"report: {path}", file=sys.stderr)
    return EXIT_FAIL if any(r.failed for r in records) else EXIT_OK


def _run(matrix, policies, models, args, full):
    if args.format == "json" or not sys.stderr.isatty():
        return matrix.run(policies, models, steps=args.steps, full=full, seed=args.seed)
    from rich.progress import Progress

    from .backends import default_backends

    backends = default_backends()
    total = len(matrix.selected_jobs(policies, models, full, backends))
    with Progress(transient=True) as bar:
        task = bar.add_task("conformance", total=total)
        return matrix.run(policies, models, steps=args.steps, full=full, backends=backends, seed=args.seed,
                          progress=lambda job: bar.update(task, advance=1,
                                                          description=f"{job.label} / {job.model}"))
