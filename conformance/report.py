"""Rendering records: the rich table, the JSON file and the Markdown report with plots."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from .records import Record, dumps, summary

STATUS_STYLE = {"pass": "green", "fail": "bold red", "error": "bold magenta", "skip": "yellow"}


def _fmt(v, spec=".2g"):
    return "" if v is None else format(v, spec)


def _numbers(r: Record) -> str:
    parts = [f"rel {_fmt(r.max_rel_err)}" if r.max_rel_err is not None else "",
             f"{_fmt(r.max_ulp_err, '.3g')} ULP" if r.max_ulp_err is not None else "",
             f"tol {_fmt(r.tolerance)}" if r.tolerance is not None else ""]
    return ", ".join(p for p in parts if p)


def rich_table(records: list[Record], title: str = "dualprec conformance"):
    """Every record (``--verbose``), laid out for 80 columns: the record's names stacked in
    the first column (policy over model and check, never broken), its status, then its
    tier, numbers (max rel err, ULP, tolerance) and where / reason, wrapped at spaces."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
              caption="numbers: max relative error, max ULP distance, tolerance")
    t.add_column("policy / model / check", no_wrap=True)
    t.add_column("status", no_wrap=True)
    t.add_column("tier, numbers, where / reason", overflow="fold", ratio=1)
    for r in records:
        note = r.reason if r.status != "pass" else (r.where or "")
        if r.step is not None and r.failed:
            note = f"[step {r.step}] {note}"
        numbers = _numbers(r)
        detail = r.tier + (f"; {numbers}" if numbers else "") + (f": {note[:240]}" if note else "")
        t.add_row(escape(f"{r.policy}\n  {r.model} / {r.check}"), f"[{STATUS_STYLE[r.status]}]{r.status}[/]",
                  escape(detail))  # "[step 2]" and reasons are text, not markup
    return t


def summary_line(records: list[Record], seconds: float | None = None) -> str:
    s = summary(records)
    tail = f" in {seconds:.1f} s" if seconds is not None else ""
    err = f", {s['error']} errors" if s.get("error") else ""
    return f"{s['pass']} passed, {s['fail']} failed{err}, {s['skip']} skipped{tail}"


def _cells(records: list[Record]):
    """(policies in order, models in order, {(policy, model): Counter of statuses})."""
    from collections import Counter

    policies, models, cells = [], [], defaultdict(Counter)
    for r in records:
        if r.policy not in policies:
            policies.append(r.policy)
        if r.model not in models:
            models.append(r.model)
        cells[(r.policy, r.model)][r.status] += 1
    return policies, models, cells


def _cell_text(c) -> str:
    if not c:
        return "[dim]·[/]"
    parts = []
    if c["pass"]:
        parts.append(f"[green]{c['pass']}ok[/]")
    if c["fail"]:
        parts.append(f"[bold red]{c['fail']}F[/]")
    if c["error"]:
        parts.append(f"[bold magenta]{c['error']}E[/]")
    if c["skip"] and not (c["pass"] or c["fail"] or c["error"]):
        parts.append("[yellow]skip[/]")
    elif c["skip"]:
        parts.append(f"[yellow]{c['skip']}s[/]")
    return " ".join(parts)


MATRIX_LEGEND = "cells: Nok passed, NF failed, NE errored, Ns skipped; · not in the lean matrix"


def matrix_table(records: list[Record], title: str = "conformance checks: policy x model"):
    """The policy x model matrix: per cell the count of passed / failed / errored checks
    (a cell that only skips says "skip"; "·" where the lean matrix does not run the pair)."""
    from rich import box
    from rich.table import Table

    policies, models, cells = _cells(records)
    t = Table(title=title, caption=MATRIX_LEGEND, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
              collapse_padding=True)
    t.add_column("policy", no_wrap=True)
    for m in models:
        # a cell wraps at its spaces ("11ok 1F" over "1E") rather than being cut
        t.add_column(m, min_width=len(m), overflow="fold")
    for p in policies:
        t.add_row(p, *(_cell_text(cells.get((p, m))) for m in models))
    return t


def wrap(text: str, width: int, indent: str = "    ") -> list[str]:
    """``text`` wrapped at ``width`` columns, continuation lines indented; never cut."""
    import textwrap

    return textwrap.wrap(text, width=max(width, 20), subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False) or [""]


def failure_lines(records: list[Record], limit: int = 12, width: int = 78) -> list[str]:
    """A few lines per failed/errored record (policy/model/check, where, step, why), wrapped
    at ``width``, then one line per distinct skip reason; at most ``limit`` failures."""
    bad = [r for r in records if r.failed]
    lines = []
    for r in bad[:limit]:
        where = f" at {r.where}" if r.where else ""
        step = f" step {r.step}" if r.step is not None else ""
        head = f"{r.status.upper()} {r.policy}/{r.model}/{r.check}{where}{step}: "
        reason = r.reason.split(": ", 1)[1] if r.reason.startswith("first divergence at ") else r.reason
        lines += wrap(head + reason[:400], width)
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more (--verbose, or the report, lists every record)")
    skips = defaultdict(set)
    for r in records:
        if r.status == "skip":
            reason = r.reason.split("; measured: ")[0]  # a named divergence keeps its numbers in the report
            skips[reason if len(reason) <= 240 else reason[:240].rsplit(" ", 1)[0] + " ..."].add(r.policy)
    if skips:
        n = len(set().union(*skips.values()))
        lines.append(f"skipped: {n} {'policy' if n == 1 else 'policies'}, e.g.")
        for reason, ps in list(skips.items())[:3]:
            names = ", ".join(sorted(ps)[:3]) + (" ..." if len(ps) > 3 else "")
            lines += wrap(f"  {names}: {reason}", width)
    return lines


def markdown_table(records: list[Record]) -> str:
    lines = ["| policy | model | check | tier | status | max rel err | ULP | tolerance | where / reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        note = (r.reason if r.status != "pass" else (r.where or "")).replace("|", "/")
        lines.append(f"| {r.policy} | {r.model} | {r.check} | {r.tier} | {r.status} | {_fmt(r.max_rel_err)} | "
                     f"{_fmt(r.max_ulp_err, '.3g')} | {_fmt(r.tolerance)} | {note[:200]} |")
    return "\n".join(lines)


def _mpl():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: plot colours of the outcomes (pass green, fail red, as in the terminal)
PASS_COLOUR, FAIL_COLOUR, SKIP_COLOUR = "#1a9850", "#d73027", "#bdbdbd"


def _status_word(recs: list[Record]) -> str:
    return "FAIL" if any(r.failed for r in recs) else "pass"


def training_figure(policy: str, recs: list[Record], params: dict | None = None):
    """One policy's training plot: loss curves of both backends per model, and the relative
    divergence of loss and parameters per step against the tolerance band.  The title of
    each model's curves says whether its training checks passed (``params``: model -> the
    train-params Record), and a failing step is marked with a red x."""
    plt = _mpl()
    params = params or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    verdicts = []
    for r in recs:
        s = r.detail["series"]
        steps = range(len(s["loss_a"]))
        both = [r] + ([params[r.model]] if r.model in params else [])
        verdicts.append(f"{r.model} {_status_word(both)}")
        line, = axes[0].plot(steps, s["loss_a"], label=f"{r.model} torch")
        axes[0].plot(steps, s["loss_b"], "--", color=line.get_color(), label=f"{r.model} jax")
        axes[1].semilogy(steps, [max(v, 1e-12) for v in s["loss_rel"]], color=line.get_color(),
                         label=f"{r.model} loss ({r.status})")
        axes[1].semilogy(steps, [max(v, 1e-12) for v in s["param_rel"]], ":", color=line.get_color(),
                         label=f"{r.model} params" + (f" ({params[r.model].status})" if r.model in params else ""))
        axes[1].semilogy(steps, s["tol"], color=line.get_color(), alpha=0.3, lw=4)
        if r.failed and r.step is not None and r.step < len(s["loss_rel"]):
            axes[1].plot([r.step], [max(s["loss_rel"][r.step], 1e-12)], "x", color=FAIL_COLOUR, ms=9, mew=2)
    axes[0].set(title=f"{policy}: loss, torch vs JAX", xlabel="step", ylabel="loss")
    axes[1].set(title="divergence per step (band = tolerance; x = failed)\n" + ", ".join(verdicts),
                xlabel="step", ylabel="max rel err (1e-12: equal)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_training(records: list[Record], out: Path) -> list[str]:
    """One figure per policy (see `training_figure`)."""
    plt = _mpl()
    by_policy = defaultdict(list)
    params = defaultdict(dict)
    for r in records:
        if r.check == "train-loss" and "series" in r.detail:
            by_policy[r.policy].append(r)
        elif r.check == "train-params":
            params[r.policy][r.model] = r
    files = []
    for policy, recs in by_policy.items():
        fig = training_figure(policy, recs, params[policy])
        name = "train_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in policy) + ".png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        files.append(name)
    return files


def heatmap_cells(records: list[Record]) -> dict:
    """(policy, model) -> (outcome, text) for the heat map: "fail" when any check failed or
    errored (whatever share passed), "pass" when every check that ran passed, "skip" when
    none ran."""
    policies, models, cells = _cells(records)
    out = {}
    for p in policies:
        for m in models:
            c = cells.get((p, m))
            if not c:
                continue
            bad = c["fail"] + c["error"]
            if bad:
                out[(p, m)] = ("fail", f"{c['pass']} ok\n{bad} FAIL")
            elif c["pass"]:
                out[(p, m)] = ("pass", f"{c['pass']} ok")
            else:
                out[(p, m)] = ("skip", "skip")
    return out


def heatmap_figure(records: list[Record]):
    """The policy x model matrix: a cell is red when any of its checks failed or errored,
    green when all that ran passed, grey when all were skipped, white when not run."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    plt = _mpl()
    policies, models, _ = _cells(records)
    if not policies:
        return None
    outcomes = heatmap_cells(records)
    code = {"fail": 0, "skip": 1, "pass": 2}
    grid = np.full((len(policies), len(models)), np.nan)
    fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 1.3 * len(models)), 1.2 + 0.32 * len(policies)))
    for (p, m), (outcome, text) in outcomes.items():
        i, j = policies.index(p), models.index(m)
        grid[i, j] = code[outcome]
        ax.text(j, i, text, ha="center", va="center", fontsize=6,
                color="white" if outcome == "fail" else "black", fontweight="bold" if outcome == "fail" else None)
    ax.imshow(grid, cmap=ListedColormap([FAIL_COLOUR, SKIP_COLOUR, PASS_COLOUR]), vmin=0, vmax=2, aspect="auto")
    ax.set_xticks(range(len(models)), models)
    ax.set_yticks(range(len(policies)), policies, fontsize=7)
    ax.set_title("green: every check passed\nred: at least one failed or errored\ngrey: all skipped; "
                 "white: not run", fontsize=7)
    fig.tight_layout()
    return fig


def _plot_heatmap(records: list[Record], out: Path) -> str | None:
    fig = heatmap_figure(records)
    if fig is None:
        return None
    fig.savefig(out / "heatmap.png", dpi=80)
    _mpl().close(fig)
    return "heatmap.png"


def _layer_fails(entry: dict) -> bool:
    """Whether one per-tensor entry (stats and bound, as judge_tensors keeps them) is past
    its bound (`tolerances.Bound.judge` on the stored numbers)."""
    b = entry.get("bound", {})
    return bool(("max_ulp" in b and entry.get("max_ulp", 0.0) > b["max_ulp"])
                or ("max_rel" in b and entry.get("max_rel", 0.0) > b["max_rel"])
                or ("max_neq" in b and entry.get("neq_frac", 0.0) > b["max_neq"]))


def layers_figure(model: str, recs: list[Record]):
    """Per layer and policy, both criteria of the layer-isolated check against their bounds:
    the ULP distance (bound dashed) and the share of elements not bitwise equal (bound
    dashed, where the bound has a share criterion).  Exact agreement is plotted at 0 (the
    axes are linear below 1 ULP / 0.1 %, logarithmic above); a layer past a bound is a red x."""
    plt = _mpl()
    layers = list(dict.fromkeys(n for r in recs for n in r.detail["per_tensor"]))
    xs = range(len(layers))
    fig, (ax_ulp, ax_neq) = plt.subplots(2, 1, figsize=(max(5, 0.6 * len(layers) + 2), 6), sharex=True)
    for r in recs:
        per = r.detail["per_tensor"]
        entries = [per.get(n) for n in layers]
        ulp = [e["max_ulp"] if e else np.nan for e in entries]
        neq = [100 * e["neq_frac"] if e else np.nan for e in entries]
        line, = ax_ulp.plot(xs, ulp, "o-", ms=3, label=f"{r.policy} ({r.status})")
        colour = line.get_color()
        ax_neq.plot(xs, neq, "o-", ms=3, color=colour, label=r.policy)
        ulp_bound = [e["bound"].get("max_ulp", np.nan) if e else np.nan for e in entries]
        neq_bound = [100 * e["bound"]["max_neq"] if e and "max_neq" in e["bound"] else np.nan for e in entries]
        ax_ulp.plot(xs, ulp_bound, "--", color=colour, lw=1, alpha=0.8)
        ax_neq.plot(xs, neq_bound, "--", color=colour, lw=1, alpha=0.8)
        bad = [i for i, e in enumerate(entries) if e and _layer_fails(e)]
        ax_ulp.plot([xs[i] for i in bad], [ulp[i] for i in bad], "x", color=FAIL_COLOUR, ms=9, mew=2)
        ax_neq.plot([xs[i] for i in bad], [neq[i] for i in bad], "x", color=FAIL_COLOUR, ms=9, mew=2)
    ax_ulp.set_yscale("symlog", linthresh=1.0)
    ax_neq.set_yscale("symlog", linthresh=0.1)
    ax_ulp.set(title=f"{model}: layer-isolated divergence\n(dashed: bound; red x: past it; 0: bitwise equal)",
               ylabel="max ULP (own dtype)")
    ax_neq.set(ylabel="% not bitwise equal")
    ax_neq.set_xticks(list(xs), layers, rotation=45, ha="right", fontsize=7)
    ax_ulp.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def _plot_layers(records: list[Record], out: Path) -> list[str]:
    """Per model, `layers_figure`."""
    plt = _mpl()
    by_model = defaultdict(list)
    for r in records:
        if r.check == "layers" and r.detail.get("per_tensor"):
            by_model[r.model].append(r)
    files = []
    for model, recs in by_model.items():
        fig = layers_figure(model, recs)
        name = f"layers_{model}.png"
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        files.append(name)
    return files


TABLE_CHECKS = ("layers", "forward", "gradients", "train-params")


def tolerance_table(records: list[Record]) -> str:
    """Markdown: per policy and tolerance check, the worst measured ULP distance (in each
    tensor's own dtype) against its calibrated tolerance, and the bitwise-equal fraction of
    all compared elements (over the models the policy ran on)."""
    rows = defaultdict(dict)
    for r in records:
        if r.check not in TABLE_CHECKS or r.status not in ("pass", "fail") or not r.detail.get("per_tensor"):
            continue
        cell = rows[r.policy].setdefault(r.check, {"ulp": 0.0, "tol": None, "eq": 0.0, "n": 0})
        for st in r.detail["per_tensor"].values():
            b = st.get("bound", {})
            ratio = (st["max_ulp"] / b["max_ulp"] if b.get("max_ulp") else
                     st["max_rel"] / b["max_rel"] if b.get("max_rel") else 0.0)
            if ratio >= cell.get("ratio", -1.0):
                cell["ratio"], cell["ulp"], cell["rel"] = ratio, st["max_ulp"], st["max_rel"]
                cell["tol"] = (f"{b['max_ulp']:.3g} ULP" if b.get("max_ulp") else
                               f"rel {st['max_rel']:.2g} / {b['max_rel']:.2g}" if b.get("max_rel") else None)
            cell["eq"] += st["size"] * (1 - st["neq_frac"])
            cell["n"] += st["size"]
    head = "| policy | " + " | ".join(f"{c}: worst / bound, bitwise =" for c in TABLE_CHECKS) + " |"
    lines = [head, "|---" * (len(TABLE_CHECKS) + 1) + "|"]
    for policy, cells in rows.items():
        out = []
        for c in TABLE_CHECKS:
            x = cells.get(c)
            if not x:
                out.append("")
                continue
            worst = x["tol"] if x["tol"] and x["tol"].startswith("rel") else f"{x['ulp']:.3g} / {x['tol']}"
            out.append(f"{worst}, {x['eq'] / max(x['n'], 1):.1%}")
        lines.append(f"| {policy} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def write_report(records: list[Record], directory, seconds: float | None = None, argv=None) -> Path:
    """Write records.json, report.md and the plots into ``directory``; return report.md's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.json").write_text(dumps(records))
    plots = _plot_training(records, out)
    heat = _plot_heatmap(records, out)
    layer_plots = _plot_layers(records, out)
    fails = [r for r in records if r.failed]
    skips = [r for r in records if r.status == "skip"]
    md = ["# dualprec conformance report", "",
          f"Command: `dualprec conformance {' '.join(argv or [])}`  ", f"Result: **{summary_line(records, seconds)}**", ""]
    if heat:
        md += ["## Matrix", "", f"![matrix]({heat})", ""]
    if fails:
        md += ["## Failures", ""]
        md += [f"- **{r.policy} / {r.model} / {r.check}**" + (f" (step {r.step})" if r.step is not None else "")
               + f": {r.reason}" for r in fails]
        md.append("")
    if skips:
        reasons = defaultdict(set)
        for r in skips:
            reasons[r.reason].add(r.policy)
        md += ["## Skipped (cannot run here, or a named divergence)", ""]
        md += [f"- {', '.join(sorted(ps))}: {reason}" for reason, ps in reasons.items()]
        md.append("")
    md += ["## Agreement per policy (error-model bounds, bitwise-equal fractions)", "",
           "Per check, the tensor closest to its bound: layer-isolated checks in ULP of the tensor's "
           "own dtype, chained checks as relative error (see docs/conformance.md for the bounds); "
           "then the share of all compared elements that are bitwise equal.", "",
           tolerance_table(records), ""]
    if layer_plots:
        md += ["## Layer-isolated divergence", ""] + [f"![{p}]({p})" for p in layer_plots] + [""]
    md += ["## Training: loss curves and divergence per step", ""]
    md += [f"![{p}]({p})" for p in plots]
    md += ["", "## All records", "", markdown_table(records), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
