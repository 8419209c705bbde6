"""`dualprec diagnose`: rank the modules a policy breaks and suggest the policy that fixes
them, for a zoo model or your own, in torch, JAX or both (see docs/diagnose.md).

    dualprec diagnose --model transformer --policy 16-mixed
    dualprec diagnose --model fragile --policy 16-mixed --backend both --report out/
    dualprec diagnose --model mypkg.models:factory --policy nf4 --target 0.2 --json

A user model is ``module:function``; the function takes the backend name ("torch" or
"jax") and returns a dict: torch ``{"model": nn.Module, "batch": (x, y)}``, JAX
``{"model": linen.Module, "variables": {...}, "batch": (x, y)}``, each optionally with a
``"loss_fn"`` (output, targets) -> scalar.  Torch and Flax module paths should match for
``--backend both`` to pair them.  Backends are imported only when run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .diagnose import DEFAULT_TARGET, DiagnoseReport, side_by_side


def build_parser(prog: str = "dualprec diagnose") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Which modules break under a policy, ranked, and the "
                                "policy with the fewest promotions that meets a target error.")
    p.add_argument("--model", required=True, help="a zoo model (mlp, transformer, cnn, opbyop, fragile) or "
                   "module:function returning the model (see docs/diagnose.md)")
    p.add_argument("--policy", required=True, help='the policy to diagnose, e.g. "16-mixed" or "nf4"')
    p.add_argument("--backend", choices=("torch", "jax", "both"), default="torch")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET,
                   help=f"largest relative loss/gradient error the suggested policy may leave (default {DEFAULT_TARGET})")
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    p.add_argument("--lr", type=float, default=1e-2, help="SGD learning rate of the runs (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the zoo weights and batches")
    p.add_argument("--no-gains", action="store_true", help="skip the promote-one-module runs (N fewer runs; "
                   "the ranking does not use them)")
    p.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and plots to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


# ----- models -------------------------------------------------------------------------
def _zoo_spec(name: str):
    from conformance.zoo import ZOO
    from conformance.zoo.fragile import FRAGILE

    specs = dict(ZOO, fragile=FRAGILE)
    if name not in specs:
        raise ValueError(f"unknown model {name!r}: use a zoo model ({', '.join(specs)}) or module:function")
    return specs[name]


def _zoo_torch(spec, seed: int, steps: int) -> dict:
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = spec.torch_module()
    batches = [tuple(torch.from_numpy(a) for a in spec.batch(1000 * seed + i)) for i in range(steps)]
    return {"model": model, "batch": batches, "loss_fn": _torch_loss(spec)}


def _torch_loss(spec):
    import torch
    import torch.nn.functional as F

    def loss_fn(out, y):
        wide = out if out.dtype in (torch.float32, torch.float64) else out.float()
        if wide.ndim > 2:
            wide = torch.movedim(wide, spec.class_axis % wide.ndim, 1)
        return F.cross_entropy(wide, y)

    return loss_fn


def _zoo_jax(spec, seed: int, steps: int, torch_model=None) -> dict:
    import jax
    import numpy as np

    from conformance.weights import torch_to_flax

    if torch_model is None:
        torch_model = _zoo_torch(spec, seed, 1)["model"]
    model = spec.flax_module()
    x0 = spec.to_jax_layout(spec.batch(1000 * seed)[0])
    structs = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0))["params"]
    params = jax.tree_util.tree_map(np.asarray, torch_to_flax(torch_model, flax_params=structs))
    batches = [(spec.to_jax_layout(x), y) for x, y in (spec.batch(1000 * seed + i) for i in range(steps))]
    return {"model": model, "variables": {"params": params}, "batch": batches}


def load_model(name: str, backend: str, seed: int = 0, steps: int = 3) -> dict:
    """The dict a factory returns, for a zoo model or ``module:function``."""
    if ":" in name:
        mod_name, _, fn_name = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--model {name}: cannot import {fn_name} from {mod_name} ({e}); give "
                             "module:function with the module on PYTHONPATH") from None
        got = fn(backend)
        need = ("model", "batch") if backend == "torch" else ("model", "variables", "batch")
        if not isinstance(got, dict) or any(k not in got for k in need):
            raise ValueError(f"--model {name}: {fn_name}({backend!r}) must return a dict with keys "
                             f"{', '.join(need)} (and optionally loss_fn)")
        return got
    spec = _zoo_spec(name)
    return _zoo_torch(spec, seed, steps) if backend == "torch" else _zoo_jax(spec, seed, steps)


def run_backend(backend: str, args, log) -> DiagnoseReport:
    got = load_model(args.model, backend, args.seed, args.steps)
    common = dict(loss_fn=got.get("loss_fn"), steps=args.steps, target=args.target, lr=args.lr,
                  gains=not args.no_gains, name=args.model, log=log)
    if backend == "torch":
        import dualprec_torch

        return dualprec_torch.diagnose(got["model"], got["batch"], args.policy, **common)
    import dualprec_jax

    return dualprec_jax.diagnose(got["model"], got["variables"], got["batch"], args.policy, **common)


# ----- output -------------------------------------------------------------------------
def agreement(reports: list[DiagnoseReport], k: int | None = None) -> dict:
    """Whether the reports rank the same modules first (the top ``k``; default: as many as
    the first report's suggestion promoted, at least 1)."""
    if len(reports) < 2:
        return {}
    k = k or max(1, len(reports[0].overrides_added))
    tops = [r.ranking[:k] for r in reports]
    return {"k": k, "top": {r.backend: t for r, t in zip(reports, tops)},
            "same_top": all(set(t) == set(tops[0]) for t in tops),
            "same_order": all(r.ranking == reports[0].ranking for r in reports)}


def render_both(reports: list[DiagnoseReport], width: int = 80) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=width)
    for r in reports:
        r.render(console, width=width)
        console.print()
    if len(reports) > 1:
        console.print("the same modules in each backend (own error, rank):", highlight=False)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("module", overflow="fold")
        for r in reports:
            table.add_column(f"{r.backend} err", justify="right")
            table.add_column("#", justify="right")
        for row in side_by_side(reports):
            table.add_row(*row)
        console.print(table)
        a = agreement(reports)
        console.print(f"top {a['k']}: " + "; ".join(f"{b}: {', '.join(t)}" for b, t in a["top"].items()) +
                      (" (agree)" if a["same_top"] else " (DIFFER)"), highlight=False)


def write_report(reports: list[DiagnoseReport], out_dir: str) -> list[str]:
    """report.md, report.json and PNG plots in ``out_dir``; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    files = []
    md = "\n".join(r.to_markdown() for r in reports)
    if len(reports) > 1:
        rows = side_by_side(reports)
        md += "\n## Side by side\n\n| module | " + " | ".join(f"{r.backend} err | #" for r in reports) + " |\n"
        md += "|---|" + "---|---|" * len(reports) + "\n"
        md += "".join("| " + " | ".join(row) + " |\n" for row in rows)
        a = agreement(reports)
        md += f"\nTop {a['k']}: " + "; ".join(f"{b}: {', '.join(t)}" for b, t in a["top"].items()) + \
              (" (agree)\n" if a["same_top"] else " (differ)\n")
    for name, text in (("report.md", md), ("report.json", json.dumps(
            {"reports": [r.to_dict() for r in reports], "agreement": agreement(reports)}, indent=2))):
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write(text)
        files.append(path)
    files += plot_reports(reports, out_dir)
    return files


def plot_reports(reports: list[DiagnoseReport], out_dir: str) -> list[str]:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    paths = list(dict.fromkeys(p for r in reports for p in r.ranking))
    if paths:  # per-layer error bars, one bar per backend
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(paths)), 4))
        w = 0.8 / len(reports)
        for i, r in enumerate(reports):
            vals = []
            for p in paths:
                try:
                    e = r.module(p).own_error
                except KeyError:
                    e = None
                vals.append(np.nan if e is None else (1e3 if math.isinf(e) else max(e, 1e-8)))
            ax.bar(np.arange(len(paths)) + i * w, vals, w, label=r.backend)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(paths)) + 0.4 - w / 2, paths, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("own error (inf drawn at 1e3)")
        ax.axhline(reports[0].target, color="k", ls="--", lw=0.8, label="target")
        ax.set_title(f"{reports[0].model} under {reports[0].policy}: error per module")
        ax.legend()
        fig.tight_layout()
        files.append(os.path.join(out_dir, "errors.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    for r in reports:  # amax over steps and underflow per module
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for m in r.modules:
            if m.amax and all(math.isfinite(v) for v in m.amax):
                a1.plot(range(len(m.amax)), m.amax, marker="o", label=m.path)
        a1.set_yscale("log")
        a1.set_xlabel("step")
        a1.set_ylabel("amax of the output")
        a1.set_title("amax over steps")
        a1.legend(fontsize=6)
        fmts = sorted({f for m in r.modules for f in m.ranges})
        names = [m.path for m in r.modules]
        for j, f in enumerate(fmts):
            vals = [m.ranges.get(f, {}).get("underflow", 0.0) + m.ranges.get(f, {}).get("subnormal", 0.0)
                    for m in r.modules]
            a2.bar(np.arange(len(names)) + j * 0.8 / max(1, len(fmts)), vals, 0.8 / max(1, len(fmts)), label=f)
        a2.set_xticks(np.arange(len(names)), names, rotation=60, ha="right", fontsize=8)
        a2.set_ylabel("fraction underflowing or subnormal")
        a2.set_title("outputs below the normal range")
        if fmts:
            a2.legend()
        fig.tight_layout()
        files.append(os.path.join(out_dir, f"ranges_{r.backend}.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))  # before / after the suggested policy
    for r in reports:
        for key, style in (("reference", "-"), ("policy", "--"), ("suggested", ":")):
            ys = [v if math.isfinite(v) else np.nan for v in r.losses.get(key, [])]
            ax.plot(range(len(ys)), ys, style, marker="o", label=f"{r.backend} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss: reference, policy, suggested policy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(os.path.join(out_dir, "before_after.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def main(argv=None, prog: str = "dualprec diagnose") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give at least 1")
    from .policy import Policy

    Policy.parse(args.policy)  # a bad policy: one line, exit 2, before any backend loads
    backends = ["torch", "jax"] if args.backend == "both" else [args.backend]
    log = None if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr))
    reports = []
    for b in backends:
        if log:
            log(f"{b}: diagnosing {args.model} under {args.policy}")
        reports.append(run_backend(b, args, log))
    if args.report:
        files = write_report(reports, args.report)
        if not args.json:
            print(f"wrote {', '.join(files)}")
    if args.json:
        print(json.dumps({"reports": [r.to_dict() for r in reports], "agreement": agreement(reports)}, indent=2))
    else:
        render_both(reports)
    return 0 if all(r.meets_target for r in reports) else 3


if __name__ == "__main__":
    sys.exit(main())
