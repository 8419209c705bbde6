"""The README's generated sections, from the code itself: what each named policy does in
each backend (from `explain`, which reads what the backends declare they run) and the op
table.  ``python -m dualprec.docgen --write`` refreshes README.md; a test fails when the
README is stale.  A tool, like the command line: it imports the installed backends so that
`explain` can describe them (the library itself never does)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .explain import explain
from .presets import PRESET_TABLE

__all__ = ["behaviour_table", "optable_summary", "sections", "write_readme"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def behaviour_table() -> str:
    """One row per named policy: dtypes, where gradients and optimizer state live, loss
    scaling, quantization/FP8, and whether the two backends' descriptions differ."""
    head = ("| policy | params | compute | outputs | gradients / optimizer state | loss scaling | "
            "quantization / fp8 (torch; jax) |\n|---|---|---|---|---|---|---|\n")
    from .cli import import_backends

    failed = import_backends()
    if failed:
        raise RuntimeError(f"the README describes both backends; these do not import: {failed}")
    rows = []
    for row in PRESET_TABLE:
        info = explain(row.policy)
        d, t, j = info["dtypes"], info["backends"]["torch"], info["backends"]["jax"]
        low = []
        for key in ("quantization", "fp8"):
            if t[key] != "none" or j[key] != "none":
                low.append(f"{key}: {t[key]}" + ("" if t[key] == j[key] else f"; jax: {j[key]}"))
        rows.append(f"| `{row.name}` | {d['params']} | {d['compute']} | {d['output']} | {_cell(t['optimizer'])} | "
                    f"{_cell(t['loss scaling'])} | {_cell(' / '.join(low) or 'none')} |")
    return head + "\n".join(rows) + "\n"


def optable_summary() -> str:
    """The three lists of the op table, one line each, with their entries' names."""
    from . import optable

    lines = []
    for name, entries, meaning in (
            ("lower", optable.LOWER, "operands (bias included) in the compute dtype, float32 accumulation"),
            ("fp32", optable.FP32, "half inputs upcast, float32 output"),
            ("promote", optable.PROMOTE, "the widest input dtype")):
        lines.append(f"- **{name}** ({meaning}): " + ", ".join(f"`{e.name}`" for e in entries))
    lines.append("- every other op (`mean`, `var`, `std`, `batch_norm`, `gelu`, ...) runs in its input dtype")
    return "\n".join(lines) + "\n"


def sections() -> dict[str, str]:
    return {"behaviour": behaviour_table(), "optable": optable_summary()}


def write_readme(path: str | Path = Path(__file__).resolve().parents[1] / "README.md") -> list[str]:
    """Replace each ``<!-- BEGIN name -->...<!-- END name -->`` block; returns the names written."""
    path = Path(path)
    text = path.read_text()
    written = []
    for name, body in sections().items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
            written.append(name)
    path.write_text(text)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite README.md's generated sections")
    ap.add_argument("section", nargs="?", choices=sorted(sections()), help="print one section")
    args = ap.parse_args(argv)
    if args.write:
        print("wrote", ", ".join(write_readme()) or "nothing (no markers in README.md)")
    else:
        for name, body in sections().items():
            if args.section in (None, name):
                print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
