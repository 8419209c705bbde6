"""The planted-bug table of docs/conformance.md ("Power on users' models"): each twin bug of
gpt_pair.py and cnn_pair.py through compare() under each policy, with the first failing
check, where it points and by how much the bound is exceeded.

    PYTHONPATH=. python tests/conformance/power_table.py        # prints the markdown table

test_conformance_power.py asserts every cell (caught, the check and the layer); the figures
(ULP, shares, margins) are this machine's and are printed, not asserted."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import cnn_pair  # noqa: E402
import gpt_pair  # noqa: E402
import torch  # noqa: E402

from conformance import compare  # noqa: E402

POLICIES = ("32-true", "bf16-mixed", "16-mixed")


@dataclasses.dataclass(frozen=True)
class Pair:
    torch_cls: type
    flax_cls: type
    data: object
    bugs: dict
    channels_last: bool = False


PAIRS = {
    "gpt": Pair(gpt_pair.TorchGPT, gpt_pair.FlaxGPT, gpt_pair.data, gpt_pair.BUGS),
    "cnn": Pair(cnn_pair.TorchCNN, cnn_pair.FlaxCNN, cnn_pair.data, cnn_pair.BUGS, channels_last=True),
}


def backends_for(bug: str, backends=None):
    """The backend pair of one cell: "output-uncast" swaps the JAX side's Precision."""
    from conformance.backends.jax_backend import JaxBackend
    from conformance.backends.torch_backend import TorchBackend

    a, b = backends or (TorchBackend(), JaxBackend())
    if bug == "output-uncast":
        b = JaxBackend(precision_cls=gpt_pair.uncast_precision())
    return a, b


def run_pair(model: str, bug: str, policy: str, backends=None, targets: bool = False, steps: int = 0):
    pair = PAIRS[model]
    torch.manual_seed(0)
    x, y = pair.data()
    flax_bug = "" if bug == "output-uncast" else bug
    return compare(pair.torch_cls(), pair.flax_cls(bug=flax_bug), None, policy, x,
                   targets=y if targets else None, steps=steps, channels_last_in_jax=pair.channels_last,
                   backends=backends_for(bug, backends), name=f"{model}:{bug or 'clean'}")


def margin(rec) -> tuple[float | None, str]:
    """(measured / bound of the criterion that failed most, the figures) of a failing record;
    (None, why) for a bit-exact record (any difference fails it)."""
    if rec.tier == "bit-exact":
        return None, rec.reason.split(";")[0]
    per = rec.detail["per_tensor"][rec.where]
    b = per["bound"]
    crit = []
    if "max_ulp" in b:
        crit.append((per["max_ulp"] / b["max_ulp"], f"{per['max_ulp']:.3g} ULP of {per['dtype']} > {b['max_ulp']:.3g}"))
    if "max_rel" in b:
        crit.append((per["max_rel"] / b["max_rel"], f"rel {per['max_rel']:.3g} > {b['max_rel']:.3g}"))
    if "median_ulp" in b:
        crit.append((per["p50_ulp"] / b["median_ulp"], f"median element {per['p50_ulp']:.3g} ULP of {per['dtype']} > "
                     f"{b['median_ulp']:.3g}"))
    if "max_neq" in b:
        crit.append((per["neq_frac"] / b["max_neq"], f"{per['neq_frac']:.1%} of {per['dtype']} flipped > "
                     f"{b['max_neq']:.1%}"))
    return max(crit)


@dataclasses.dataclass
class Cell:
    model: str
    bug: str
    policy: str
    ok: bool
    first: str | None = None       # the first failing check
    where: str | None = None
    margin: float | None = None    # measured / bound (None: bit-exact)
    figures: str = ""
    failing: tuple = ()            # (check, where) of every failing record
    errors: tuple = ()

    def text(self) -> str:
        if self.ok:
            return "pass"
        m = "bit-exact" if self.margin is None else f"{self.margin:.3g}x"
        more = [f"`{c}` at {w}" for c, w in self.failing if c != self.first]
        return (f"**caught** `{self.first}` at {self.where}: {self.figures} ({m})"
                + (f"; also {', '.join(more)}" if more else ""))


def run_cell(model: str, bug: str, policy: str, backends=None) -> Cell:
    r = run_pair(model, bug, policy, backends)
    fails = r.failures()
    errors = tuple(f"{x.check}: {x.reason}" for x in r.records if x.status == "error")
    if not fails:
        return Cell(model, bug, policy, True, errors=errors)
    first = fails[0]
    m, figures = margin(first)
    return Cell(model, bug, policy, False, first.check, first.where, m, figures,
                tuple((x.check, x.where) for x in fails), errors)


#: (model, bug, policy) -> why the planted difference is no bug under that policy
NO_BUG = {
    **{(m, "output-uncast", "32-true"): "compute = output dtype" for m in PAIRS},
    **{(m, "accum-half", "32-true"): "accumulates in float32, in order: another summation order" for m in PAIRS},
    ("gpt", "softmax-half", "32-true"): "the scores are float32",
}


def table(cells: list[Cell]) -> str:
    lines = []
    for model in PAIRS:
        lines += [f"**{model}**", "", "| planted bug | " + " | ".join(POLICIES) + " |",
                  "|---" * (len(POLICIES) + 1) + "|"]
        rows = {}
        for c in cells:
            if c.model == model:
                why = NO_BUG.get((c.model, c.bug, c.policy))
                txt = c.text() if not why else f"no bug ({why}): {c.text()}"
                rows.setdefault(c.bug, {})[c.policy] = txt
        for bug, row in rows.items():
            desc = PAIRS[model].bugs.get(bug, "none (the correct twin)")
            lines.append(f"| {desc} | " + " | ".join(row.get(p, "") for p in POLICIES) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    cells = [run_cell(m, bug, p) for m in PAIRS for bug in ("", *PAIRS[m].bugs) for p in POLICIES]
    print(table(cells))
    for c in cells:
        if c.errors:
            print("ERROR", c.model, c.bug, c.policy, c.errors)


if __name__ == "__main__":
    main()
