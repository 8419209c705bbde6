"""``calibrate``: the envelope of a user's own pair on this machine, next to the bounds.

Example::

    from conformance import calibrate

    env = calibrate(TorchGPT, FlaxGPT(), None, "bf16-mixed", lambda s: data(seed=s), seeds=range(5))
    print(env.table())

compare() runs once per seed; for each check the largest ``measured / bound`` over seeds,
tensors and criteria (max ULP, max relative, share of flipped elements, median element) is
kept with where it was.  The bounds are not changed by it: they follow from the arithmetic
(conformance/tolerances.py) and hold on every machine; the envelope says how close this
pair comes to them here (a ratio near 1 on a correct pair: the bound is tight for it, or
the pair has a real difference the bounds only just allow).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import numpy as np

from .compare import Comparison, compare

_CRITERIA = (("max_ulp", "max_ulp", "max ULP"), ("max_rel", "max_rel", "max rel"),
             ("neq_frac", "max_neq", "flipped share"), ("p50_ulp", "median_ulp", "median ULP"))


def record_ratios(rec) -> list[tuple[float, str, str, float, float]]:
    """(measured / bound, tensor, criterion, measured, bound) of every judged figure of a
    tolerance record (empty for bit-exact ones)."""
    out = []
    for name, st in (rec.detail or {}).get("per_tensor", {}).items():
        b = st.get("bound", {})
        for got_key, bound_key, label in _CRITERIA:
            if bound_key in b and got_key in st and b[bound_key]:
                out.append((st[got_key] / b[bound_key], name, label, st[got_key], b[bound_key]))
    if rec.check == "loss":
        for be, d in (rec.detail or {}).items():
            if isinstance(d, dict) and d.get("bound"):
                out.append((d["err"] / d["bound"], be, "loss error", d["err"], d["bound"]))
    if rec.check == "update" and "worst_ratio" in (rec.detail or {}):
        out.append((rec.detail["worst_ratio"], "first step", "rounding ratio", rec.detail["worst_ratio"], 1.0))
    return out


@dataclasses.dataclass
class Envelope:
    """check -> (largest ratio, seed, tensor, criterion, measured, bound); ``failed``: the
    checks that failed on some seed (a bit-exact check, or a bound exceeded)."""

    rows: dict[str, tuple]
    failed: dict[str, list[int]]
    runs: list[Comparison]

    def table(self) -> str:
        lines = [f"{'check':<12} {'ratio':>8}  {'seed':>4}  where"]
        for check, (ratio, seed, tensor, label, got, bound) in self.rows.items():
            lines.append(f"{check:<12} {ratio:8.3g}  {seed:>4}  {tensor}: {label} {got:.3g} of bound {bound:.3g}")
        for check, seeds in self.failed.items():
            lines.append(f"{check:<12} FAILED on seeds {seeds}")
        return "\n".join(lines)


def calibrate(torch_fn: Any, jax_fn: Any, weight_map: Any, policy: Any, data: Callable,
              seeds: Iterable[int] = (0, 1, 2), **compare_kwargs) -> Envelope:
    """compare() once per seed and the envelope of every tolerance check against its bound.

    ``data(seed)``: the input, or ``(input, targets)``.  ``torch_fn``: a module (the same
    weights on every seed) or a callable building one (called after ``torch.manual_seed(seed)``:
    weights drawn per seed).  Other keywords go to :func:`compare` (``steps``, ``class_axis``...)."""
    import torch

    rows: dict[str, tuple] = {}
    failed: dict[str, list[int]] = {}
    runs = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = torch_fn if isinstance(torch_fn, torch.nn.Module) else torch_fn()
        batch = data(seed)
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        r = compare(model, jax_fn, weight_map, policy, np.asarray(x), targets=y, **compare_kwargs)
        runs.append(r)
        for rec in r.records:
            if rec.failed:
                failed.setdefault(rec.check, []).append(seed)
            for ratio, tensor, label, got, bound in record_ratios(rec):
                if rec.check not in rows or ratio > rows[rec.check][0]:
                    rows[rec.check] = (ratio, seed, tensor, label, got, bound)
    return Envelope(rows, failed, runs)
