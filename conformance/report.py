"""Rendering records: the rich table, the JSON file and the Markdown report with plots."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from .records import Record, dumps, summary

STATUS_STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def _fmt(v, spec=".2g"):
    return "" if v is None else format(v, spec)


def rich_table(records: list[Record], title: str = "dualprec conformance"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("policy", "model", "check", "tier", "status", "max rel", "ULP", "tol", "where / reason"):
        t.add_column(col, overflow="fold")
    for r in records:
        note = r.reason if r.status != "pass" else (r.where or "")
        if r.step is not None and r.status == "fail":
            note = f"[step {r.step}] {note}"
        t.add_row(r.policy, r.model, r.check, r.tier, f"[{STATUS_STYLE[r.status]}]{r.status}[/]",
                  _fmt(r.max_rel_err), _fmt(r.max_ulp_err, ".3g"), _fmt(r.tolerance), note[:160])
    return t


def summary_line(records: list[Record], seconds: float | None = None) -> str:
    s = summary(records)
    tail = f" in {seconds:.1f} s" if seconds is not None else ""
    return f"{s['pass']} passed, {s['fail']} failed, {s['skip']} skipped{tail}"


def markdown_table(records: list[Record]) -> str:
    lines = ["| policy | model | check | tier | status | max rel err | ULP | tolerance | where / reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        note = (r.reason if r.status != "pass" else (r.where or "")).replace("|", "/")
        lines.append(f"| {r.policy} | {r.model} | {r.check} | {r.tier} | {r.status} | {_fmt(r.max_rel_err)} | "
                     f"{_fmt(r.max_ulp_err, '.3g')} | {_fmt(r.tolerance)} | {note[:200]} |")
    return "\n".join(lines)


def _plot_training(records: list[Record], out: Path) -> list[str]:
    """One figure per policy: loss curves of both backends per model, and the relative
    divergence of loss and parameters per step against the tolerance."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_policy = defaultdict(list)
    for r in records:
        if r.check == "train-loss" and "series" in r.detail:
            by_policy[r.policy].append(r)
    files = []
    for policy, recs in by_policy.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for r in recs:
            s = r.detail["series"]
            steps = range(len(s["loss_a"]))
            line, = axes[0].plot(steps, s["loss_a"], label=f"{r.model} torch")
            axes[0].plot(steps, s["loss_b"], "--", color=line.get_color(), label=f"{r.model} jax")
            axes[1].semilogy(steps, [max(v, 1e-12) for v in s["loss_rel"]], color=line.get_color(),
                             label=f"{r.model} loss")
            axes[1].semilogy(steps, [max(v, 1e-12) for v in s["param_rel"]], ":", color=line.get_color(),
                             label=f"{r.model} params")
            axes[1].semilogy(steps, s["tol"], color=line.get_color(), alpha=0.3, lw=4)
        axes[0].set(title=f"{policy}: loss, torch vs JAX", xlabel="step", ylabel="loss")
        axes[1].set(title="divergence per step (band = tolerance)", xlabel="step", ylabel="max rel err")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        name = "train_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in policy) + ".png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        files.append(name)
    return files


def write_report(records: list[Record], directory, seconds: float | None = None, argv=None) -> Path:
    """Write records.json, report.md and the plots into ``directory``; return report.md's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.json").write_text(dumps(records))
    plots = _plot_training(records, out)
    fails = [r for r in records if r.status == "fail"]
    skips = [r for r in records if r.status == "skip"]
    md = ["# dualprec conformance report", "",
          f"Command: `dualprec conformance {' '.join(argv or [])}`  ", f"Result: **{summary_line(records, seconds)}**", ""]
    if fails:
        md += ["## Failures", ""]
        md += [f"- **{r.policy} / {r.model} / {r.check}**" + (f" (step {r.step})" if r.step is not None else "")
               + f": {r.reason}" for r in fails]
        md.append("")
    if skips:
        reasons = defaultdict(set)
        for r in skips:
            reasons[r.reason].add(r.policy)
        md += ["## Skipped (cannot run here)", ""]
        md += [f"- {', '.join(sorted(ps))}: {reason}" for reason, ps in reasons.items()]
        md.append("")
    md += ["## Training: loss curves and divergence per step", ""]
    md += [f"![{p}]({p})" for p in plots]
    md += ["", "## All records", "", markdown_table(records), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
