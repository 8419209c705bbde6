"""The README's benchmark table and figure, generated from results JSON: TFLOP/s per policy
(hand-written and dualprec, both backends, with the ratio) and measured bytes per parameter,
stamped with the date, machine and software versions of the run.

    python -m bench plot bench/results/2026-11-28-h200-gpu.json
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .harness import Record, ResultsFile

__all__ = ["load_records", "speed_markdown", "memory_markdown", "plot_figure", "write_report", "stamp"]

IMPL_ORDER = ("hand", "dualprec")
BACKENDS = ("torch", "jax")


def load_records(files: Iterable[str | os.PathLike]) -> tuple[list[Record], list[dict]]:
    records, envs = [], []
    for f in files:
        data = ResultsFile.load(f)
        records.extend(data["records"])
        envs.append(data["environment"])
    return records, envs


def stamp(envs: Sequence[dict]) -> str:
    """One line naming when, where and with what the figures were measured."""
    if not envs:
        return ""
    env = envs[0]
    v = env.get("versions", {})
    soft = ", ".join(f"{k} {v[k]}" for k in ("dualprec", "torch", "jax", "flax") if v.get(k))
    dates = sorted({e.get("date") for e in envs if e.get("date")})
    machines = sorted({e.get("machine") for e in envs if e.get("machine")})
    return f"{' / '.join(dates)} on {', '.join(machines)} ({soft})"


def _train(records):
    # Training steps only: micro-benchmarks (the nf4 GEMV) share policy/backend/mode with the
    # training rows and would overwrite them in the per-(policy, backend, mode) table.
    return [r for r in records if r.mode != "memory" and r.impl in IMPL_ORDER and "gemv" not in r.workload]


def _policies(records) -> list[str]:
    seen = []
    for r in records:
        if r.policy not in seen:
            seen.append(r.policy)
    return seen


def speed_markdown(records: Sequence[Record]) -> str:
    """One line per (policy, backend, mode): hand-written and dualprec TFLOP/s, the step-time
    ratio, and why a cell is empty where it is."""
    rows = ["| policy | backend | mode | hand TFLOP/s | dualprec TFLOP/s | dualprec / hand step time | note |",
            "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    groups: dict[tuple, dict[str, Record]] = {}
    for r in _train(records):
        groups.setdefault((r.policy, r.backend, r.mode), {})[r.impl] = r
    for (policy, backend, mode), by_impl in groups.items():
        hand, dp = by_impl.get("hand"), by_impl.get("dualprec")
        notes = [f"{impl}: {r.status}" + (f" ({r.reason})" if r.reason and not r.ok else "")
                 for impl, r in by_impl.items() if not r.ok]
        rows.append(f"| {policy} | {backend} | {mode} | {_num(hand)} | {_num(dp)} | "
                    f"{'-' if not dp or dp.baseline_ratio is None else format(dp.baseline_ratio, '.3f')} | "
                    f"{'; '.join(notes)} |")
    return "\n".join(rows)


def _num(r: Record | None) -> str:
    return "-" if r is None or r.tflops is None else f"{r.tflops:.2f}"


def memory_markdown(records: Sequence[Record]) -> str:
    rows = ["| policy | backend | weights | grads | optimizer | total (measured) | total (theory) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        if r.mode != "memory" or not r.ok:
            continue
        m = r.extra["memory"]["bytes_per_param"]
        theory = r.extra.get("theory_bytes_per_param", {}).get("total")
        rows.append(f"| {r.policy} | {r.backend} | {m['weights']:.3f} | {m['grads']:.3f} | {m['optimizer']:.3f} | "
                    f"{m['total']:.3f} | {'-' if theory is None else format(theory, 'g')} |")
    return "\n".join(rows)


def plot_figure(records: Sequence[Record], envs: Sequence[dict], path: str | os.PathLike) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in _train(records) if r.mode in ("eager", "jit")]
    policies = _policies(train) or _policies(records)
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = [(b, i) for b in BACKENDS for i in IMPL_ORDER]
    width = 0.8 / len(series)
    for k, (backend, impl) in enumerate(series):
        values = []
        for p in policies:
            r = next((r for r in train if r.policy == p and r.backend == backend and r.impl == impl), None)
            values.append(r.tflops if r is not None and r.tflops is not None else 0.0)
        ax_speed.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(policies))], values, width,
                     label=f"{backend} {impl}")
    ax_speed.set_xticks(range(len(policies)), policies, rotation=20)
    ax_speed.set_ylabel("TFLOP/s (training step)")
    ax_speed.set_title("speed (empty bar: not run / not implemented)")
    ax_speed.legend(fontsize=8)

    mem = [r for r in records if r.mode == "memory" and r.ok]
    mem_policies = _policies(mem)
    parts = ("weights", "grads", "optimizer")
    for j, backend in enumerate(BACKENDS):
        bottoms = [0.0] * len(mem_policies)
        for part in parts:
            vals = []
            for p in mem_policies:
                r = next((r for r in mem if r.policy == p and r.backend == backend), None)
                vals.append(r.extra["memory"]["bytes_per_param"][part] if r else 0.0)
            xs = [i + (j - 0.5) * 0.4 for i in range(len(mem_policies))]
            ax_mem.bar(xs, vals, 0.38, bottom=bottoms, label=f"{backend} {part}",
                       hatch="//" if backend == "jax" else None, alpha=0.85)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax_mem.set_xticks(range(len(mem_policies)), mem_policies, rotation=20)
    ax_mem.set_ylabel("bytes per parameter")
    ax_mem.set_title("memory (measured; torch left, jax right)")
    ax_mem.legend(fontsize=7, ncol=2)
    fig.suptitle(stamp(envs), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write `<stem>.png` and `<stem>.md` (the README snippet) for the given results files."""
    records, envs = load_records(files)
    first = Path(files[0])
    out = Path(out_dir) if out_dir is not None else first.parent
    png = plot_figure(records, envs, out / f"{first.stem}.png")
    ceilings = [r for r in records if r.impl == "ceiling" and r.ok]
    lines = [f"Measured {stamp(envs)}.", "", speed_markdown(records), ""]
    if ceilings:
        lines += ["| GEMM ceiling | backend | TFLOP/s |", "| --- | --- | ---: |"]
        lines += [f"| {r.policy} ({r.workload}) | {r.backend} | {r.tflops:.1f} |" for r in ceilings]
        lines.append("")
    if any(r.mode == "memory" for r in records):
        lines += ["Bytes per parameter:", "", memory_markdown(records), ""]
    lines.append(f"![TFLOP/s and memory per policy]({png.name})")
    md = out / f"{first.stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return [png, md]
