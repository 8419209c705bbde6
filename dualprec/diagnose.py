"""`diagnose`: which modules break under a policy, and the policy that fixes them.

The spec-layer half of ``dualprec_torch.diagnose`` / ``dualprec_jax.diagnose`` and of
``dualprec diagnose``: the report type (`DiagnoseReport`, `ModuleReport`), the statistics
computed from NumPy arrays, and the search that ranks modules and suggests a policy.  It
imports neither torch nor JAX: a backend supplies one function,

    run(policy, capture) -> Trace

which trains a copy of the model for a few steps under ``policy`` from the same weights and
batches every time, and returns the losses, the unscaled parameter gradients and (when
``capture``) each module's forward output per step.

The search (docs/diagnose.md):

1. the policy and a high-precision reference (float32; float64 for a 32-bit policy) run
   once, with every module's output captured: forward error, SQNR, range statistics, amax;
2. per module ``m`` two variants: *promoted* (the policy, with ``m`` raised one level:
   quantization skipped, FP8 off, or float32) and *isolated* (the reference precision
   everywhere except ``m``, which keeps the policy).  The isolated error is what ``m`` does
   on its own; the promoted gain (error of the policy minus error with ``m`` promoted) is
   what promoting ``m`` alone buys, which a second fragile module can mask (a NaN from one
   layer hides the fix of another).  Modules are ranked by their *own* isolated error (a
   container's minus its children's), so a block that is fragile only through one child
   ranks below that child;
3. greedy: promote modules in ranked order, re-running the policy after each, until the
   error is under ``target``; then drop each promotion that is not needed (re-run
   without it).  The last run verifies the suggested policy.

For N candidate modules that is 2 + 2N + k + k' runs (k promotions added, k' pruned; one
more under loss scaling, the floor the reference with loss scaling leaves): O(N) runs of
``steps`` training steps each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from .dtypes import HALF_DTYPES
from .errors import PolicyError
from .policy import Policy, _path_matches, _replace

__all__ = ["Trace", "ModuleReport", "DiagnoseReport", "rel_error", "sqnr_db", "range_fractions",
           "formats_of", "promote", "isolate", "reference_policy", "search", "DEFAULT_TARGET", "FORMAT_LIMITS"]

#: The default target: the largest relative error (loss or gradient) the suggested policy may leave.
DEFAULT_TARGET = 0.05

#: format -> (largest finite, smallest normal, smallest subnormal) magnitudes
FORMAT_LIMITS = {
    "float16": (65504.0, 2.0**-14, 2.0**-24),
    "bfloat16": (3.3895313892515355e38, 2.0**-126, 2.0**-133),
    "float32": (3.4028234663852886e38, 2.0**-126, 2.0**-149),
    "e4m3": (448.0, 2.0**-6, 2.0**-9),
    "e5m2": (57344.0, 2.0**-14, 2.0**-16),
    "e2m1": (6.0, 1.0, 0.5),
}


# ----- statistics ------------------------------------------------------------------------
def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def rel_error(a, ref) -> float:
    """||a - ref|| / ||ref|| in float64; inf where ``a`` is not finite but ``ref`` is."""
    a, ref = _f64(a).ravel(), _f64(ref).ravel()
    if a.shape != ref.shape:
        raise ValueError(f"rel_error: shapes differ ({a.shape} vs {ref.shape})")
    if not np.isfinite(ref).all():
        return math.nan
    if not np.isfinite(a).all():
        return math.inf
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(a - ref))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def sqnr_db(a, ref) -> float:
    """Signal-to-quantization-noise ratio of ``a`` against ``ref``, in dB (inf when equal)."""
    e = rel_error(a, ref)
    if math.isnan(e):
        return math.nan
    if e == 0.0:
        return math.inf
    if math.isinf(e):
        return -math.inf
    return -20.0 * math.log10(e)


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    """``x`` as rows of ``block`` elements along its last axis (zero padded)."""
    flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    pad = (-flat.shape[1]) % block
    if pad:
        flat = np.pad(flat, ((0, 0), (0, pad)))
    return flat.reshape(-1, block)


def _scaled(x: np.ndarray, fmt: str) -> tuple[np.ndarray, str]:
    """The values a format stores after its scaling: (scaled array, element format)."""
    x = np.abs(_f64(x))
    if fmt in ("float16", "bfloat16", "float32"):
        return x, fmt
    if fmt in ("e4m3", "e5m2"):  # per-tensor current scaling: amax -> the format's max
        amax = float(x.max()) if x.size else 0.0
        return (x * (FORMAT_LIMITS[fmt][0] / amax) if amax > 0 else x), fmt
    if fmt == "mxfp8":  # blocks of 32, power-of-two scales: the block amax's exponent -> e4m3's emax (8)
        b = _blocks(x, 32)
        amax = b.max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 8, 0)
        return b / np.exp2(e), "e4m3"
    if fmt == "nvfp4":  # blocks of 16: the block amax -> e2m1's max (6)
        b = _blocks(x, 16)
        amax = b.max(axis=1, keepdims=True)
        return np.where(amax > 0, b * (6.0 / np.where(amax > 0, amax, 1.0)), b), "e2m1"
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(list(FORMAT_LIMITS) + ['mxfp8', 'nvfp4'])}")


def range_fractions(x, fmt: str) -> dict[str, float]:
    """Fractions of the nonzero finite values of ``x`` that, stored in ``fmt`` (a dtype, or an
    FP8/MX/NVFP4 format with its scaling), overflow (beyond the largest finite), underflow
    to zero (below half the smallest subnormal) or land in the subnormal range."""
    v, elem = _scaled(x, fmt)
    v = v[np.isfinite(v) & (v != 0)]
    if not v.size:
        return {"overflow": 0.0, "underflow": 0.0, "subnormal": 0.0}
    big, normal, sub = FORMAT_LIMITS[elem]
    n = float(v.size)
    return {"overflow": float((v > big).sum()) / n,
            "underflow": float((v < sub / 2).sum()) / n,
            "subnormal": float(((v >= sub / 2) & (v < normal)).sum()) / n}


def formats_of(policy: Policy, path: str) -> list[str]:
    """The low-precision formats the module at ``path`` stores activations in under ``policy``:
    its compute dtype when 16-bit, and its FP8 recipe's element format."""
    p = policy.for_module(path)
    out = [p.compute_dtype] if p.compute_dtype in HALF_DTYPES else []
    if p.fp8 is not None:
        out.append({"mxfp8": "mxfp8", "nvfp4": "nvfp4"}.get(p.fp8.scaling, "e4m3"))
    return out


def weight_quant_error(w: np.ndarray, policy: Policy, path: str) -> float | None:
    """Relative error of the weight [out, in] of the linear layer at ``path`` after the
    policy's quantization (bitsandbytes' NF4/FP4/int8 codecs of dualprec.ref) or FP8 cast
    (per-tensor current scaling), None when the policy stores it unquantized."""
    p = policy.for_module(path)
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        return None
    q = p.quantization
    if q is not None and not q.skips(path):  # policy.quantizes(path)
        if q.is_4bit:
            from .ref.fourbit import dequantize_4bit, quantize_4bit

            packed, state = quantize_4bit(w, q.quant_type, q.blocksize, q.double_quant)
            return rel_error(np.asarray(dequantize_4bit(packed, state)).reshape(w.shape), w)
        from .ref.int8 import int8_dequantize_weight, int8_quantize_weight

        return rel_error(int8_dequantize_weight(*int8_quantize_weight(w)), w)
    if p.fp8 is not None and p.fp8.scaling in ("delayed", "current", "rowwise", "rowwise_with_gw_hp"):
        from .ref.fp8 import dequantize_fp8, fp8_current_scale, quantize_fp8

        s = fp8_current_scale(w, "float8_e4m3fn")
        return rel_error(dequantize_fp8(quantize_fp8(w, s, "float8_e4m3fn"), s), w)
    return None


# ----- what a backend returns ------------------------------------------------------------
@dataclasses.dataclass
class Trace:
    """A few training steps of one model under one policy, as NumPy.

    ``grads[t]``: parameter name -> the *unscaled* gradient at step t (names as the backend
    spells them); ``outputs[t]``: module path -> forward output at step t (when captured);
    ``scales[t]``: the loss scale step t used (1.0 without loss scaling); ``skipped[t]``:
    whether the optimizer step was skipped for non-finite gradients after ``retries[t]``
    retries of the same batch (dynamic loss scaling: a step whose loss is finite but whose
    scaled gradients overflow is retried at the backed-off scale, as training would on the
    next batch; the weights have not moved)."""

    losses: list[float]
    grads: list[dict[str, np.ndarray]]
    scales: list[float]
    skipped: list[bool]
    outputs: list[dict[str, np.ndarray]] | None = None
    seconds: float = 0.0
    retries: list[int] = dataclasses.field(default_factory=list)


def trace_error(trace: Trace, ref: Trace) -> tuple[float, float]:
    """(loss error, gradient error) of ``trace`` against ``ref``: the largest relative
    error of the loss over the steps, and the largest relative error of all gradients
    together (the names both have) over the steps that were not skipped; inf when a loss
    is not finite or every step was skipped."""
    loss_err = 0.0
    for a, b in zip(trace.losses, ref.losses):
        if not math.isfinite(a):
            return math.inf, math.inf
        loss_err = max(loss_err, abs(a - b) / max(abs(b), 1e-30))
    grad_err, compared = 0.0, 0
    for t, (ga, gb) in enumerate(zip(trace.grads, ref.grads)):
        if trace.skipped[t]:
            continue
        names = sorted(set(ga) & set(gb))
        if not names:
            continue
        grad_a = np.concatenate([_f64(ga[n]).ravel() for n in names])
        grad_b = np.concatenate([_f64(gb[n]).ravel() for n in names])
        grad_err = max(grad_err, rel_error(grad_a, grad_b))
        compared += 1
    if not compared and trace.grads:
        grad_err = math.inf
    return loss_err, grad_err


def error_of(trace: Trace, ref: Trace) -> float:
    """The one number the search drives under the target: max(loss error, gradient error)."""
    return max(trace_error(trace, ref))


# ----- policy edits ----------------------------------------------------------------------
def reference_policy(policy: Policy) -> Policy:
    """float32, or float64 where the policy is 32-bit already (no 16-bit dtype, no
    quantization, no FP8 anywhere)."""
    low = any(q.quantization is not None or q.fp8 is not None or
              {q.param_dtype, q.compute_dtype, q.output_dtype} & set(HALF_DTYPES)
              for _, q in policy.policies())
    return Policy.parse("32-true" if low else "64-true")


def promotion_kind(policy: Policy, path: str) -> str | None:
    """What promoting ``path`` changes: "quant" (skip its quantization), "fp8" (FP8 off),
    "float32" (params, compute and output in float32), None when it runs in 32 bits already."""
    p = policy.for_module(path)
    if policy.quantizes(path):
        return "quant"
    if p.fp8 is not None:
        return "fp8"
    if {p.param_dtype, p.compute_dtype, p.output_dtype} & set(HALF_DTYPES):
        return "float32"
    return None


def _governing(policy: Policy, path: str) -> str | None:
    for pattern, _ in policy.overrides:
        if _path_matches(path, pattern):
            return pattern
    return None


def promote(policy: Policy, path: str) -> Policy:
    """``policy`` with the module at ``path`` (and its children) raised one level:
    quantization skipped (``quant=...(skip=path)``), FP8 off (``@path=(fp8=none)``) or
    float32 (``@path=(params=float32,compute=float32,output=float32)``).  The new override
    goes first, so it wins over a broader pattern that also matches ``path``."""
    kind = promotion_kind(policy, path)
    if kind is None:
        raise PolicyError(f"promote: {path!r} runs in 32 bits under {policy} already; nothing to promote")
    sub = policy.for_module(path)
    if kind == "quant":
        q = sub.quantization
        assert q is not None, "promotion_kind is quant only where the module is quantized"
        new_q = _replace(q, skip=q.skip + (path,))
        pattern = _governing(policy, path)
        if pattern is None:
            return _replace(policy, quantization=new_q)
        return _replace(policy, overrides=tuple((pat, _replace(s, quantization=new_q) if pat == pattern else s)
                                                for pat, s in policy.overrides))
    if kind == "fp8":
        new = _replace(sub, fp8=None)
    else:
        wide = lambda d: "float32" if d in HALF_DTYPES else d  # noqa: E731
        # without autocast ("-true" policies) nothing reconciles a float32 output with the
        # half tensors of its neighbours: the promoted module hands back the dtype it did
        out = sub.compute_dtype if not sub.is_mixed and sub.compute_dtype in HALF_DTYPES else wide(sub.output_dtype)
        new = _replace(sub, param_dtype="float32", compute_dtype="float32", output_dtype=out,
                       reduce_dtype=wide(sub.reduce_dtype), master_weights=False)
    rest = tuple((pat, s) for pat, s in policy.overrides if pat != path)
    return _replace(policy, overrides=((path, new),) + rest)


def isolate(policy: Policy, path: str, reference: Policy) -> Policy:
    """The reference precision everywhere except the module at ``path``, which keeps the
    policy it has under ``policy`` (the loss scaling stays the policy's: it is global)."""
    sub = _replace(policy.for_module(path), overrides=())
    top = _replace(reference, loss_scale=policy.loss_scale, nonfinite=policy.nonfinite)
    if sub.master_weights:
        sub = _replace(sub, master_weights=False)
    return _replace(top, overrides=((path, sub),))


def _minimal(policy: Policy, base: Policy, paths: Sequence[str]) -> Policy:
    out = base
    for p in paths:
        if promotion_kind(out, p) is not None:
            out = promote(out, p)
    return out


# ----- the report ------------------------------------------------------------------------
def _num(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _unnum(x):
    return float(x) if x in ("nan", "inf", "-inf") else x


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _num(obj)


def _restore(obj):
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return _unnum(obj)


@dataclasses.dataclass
class ModuleReport:
    """One module: its statistics under the policy against the reference run."""

    path: str
    kind: str
    promotion: str | None          # what promoting it changes (quant / fp8 / float32), None: 32-bit already
    fwd_rel_error: float | None     # its output at step 0, policy vs reference (same weights, same batch)
    fwd_sqnr_db: float | None
    grad_rel_error: float | None    # its parameters' gradients at step 0 (None: no parameters)
    grad_sqnr_db: float | None
    ranges: dict[str, dict[str, float]]  # format -> overflow / underflow / subnormal fractions of its outputs
    amax: list[float]                # amax of its output per step (policy run)
    amax_growth: float | None        # amax at the last step / amax at the first
    weight_quant_error: float | None  # relative error of its weight after quantization / FP8 cast
    isolated_error: float | None = None  # error with only this module under the policy
    own_error: float | None = None       # isolated error minus its children's (the ranking key)
    promoted_error: float | None = None  # error of the policy with this module promoted
    gain: float | None = None            # policy error - promoted error
    rank: int | None = None

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> ModuleReport:
        return cls(**_restore(d))


@dataclasses.dataclass
class DiagnoseReport:
    """What `diagnose` found for one model under one policy in one backend."""

    backend: str
    model: str
    policy: str
    reference: str
    steps: int
    target: float
    loss_error: float
    grad_error: float
    error: float
    modules: list[ModuleReport]
    ranking: list[str]
    suggested: str | None            # the suggested policy (canonical string), None when none meets the target
    suggested_error: float | None    # its error, re-run (verified)
    suggested_loss_error: float | None
    suggested_grad_error: float | None
    meets_target: bool
    overrides_added: list[str]
    loss_scale: dict                 # scales, skipped steps, headroom (bits) and underflow of the scaled gradients
    timings: dict[str, float]
    runs: int
    losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # policy / reference / suggested
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # variant policy -> why it could not run

    # -- machine output -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modules"] = [m.to_dict() for m in self.modules]
        return {"schema": 1, "kind": "dualprec.diagnose", **_clean(d)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kw))

    @classmethod
    def from_dict(cls, d: dict) -> DiagnoseReport:
        d = {k: v for k, v in d.items() if k not in ("schema", "kind")}
        mods = [ModuleReport.from_dict(m) for m in d.pop("modules")]
        return cls(modules=mods, **_restore(d))

    @classmethod
    def from_json(cls, text: str) -> DiagnoseReport:
        return cls.from_dict(json.loads(text))

    def module(self, path: str) -> ModuleReport:
        for m in self.modules:
            if m.path == path:
                return m
        raise KeyError(f"no module {path!r} in this report; modules: {', '.join(m.path for m in self.modules)}")

    # -- people ---------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        ls = self.loss_scale
        lines = [f"{self.backend}: {self.model} under {self.policy} vs {self.reference}, {self.steps} steps",
                 f"error {_fmt(self.error)} (loss {_fmt(self.loss_error)}, grad {_fmt(self.grad_error)}), "
                 f"target {_fmt(self.target)}"]
        if ls.get("enabled"):
            lines.append(f"loss scale {ls['scales']} backoffs {ls.get('retries')} headroom "
                         f"{_fmt(ls.get('headroom_bits'))} bits, scaled grads underflowing "
                         f"{_fmt(ls.get('underflow'))}")
        if self.suggested is not None:
            lines.append(f"suggested: {self.suggested}")
            lines.append(f"  verified error {_fmt(self.suggested_error)} "
                         f"({'meets' if self.meets_target else 'misses'} the target)")
        else:
            lines.append("suggested: none (no module to promote)")
        lines.append(f"{self.runs} runs in {self.timings.get('total', 0.0):.1f} s")
        return lines

    def table_rows(self, limit: int | None = None) -> list[list[str]]:
        rows = []
        order = {p: i for i, p in enumerate(self.ranking)}
        mods = sorted(self.modules, key=lambda m: order.get(m.path, len(order)))
        for m in mods[:limit]:
            worst = max((f[k] for f in m.ranges.values() for k in ("overflow", "underflow")), default=0.0)
            rows.append([str(m.rank) if m.rank is not None else "-", m.path, m.kind, _fmt(m.own_error),
                         _fmt(m.gain), _fmt(m.fwd_rel_error), _fmt(m.grad_rel_error), _fmt(worst),
                         _fmt(m.weight_quant_error)])
        return rows

    HEADERS = ["#", "module", "kind", "own err", "gain", "fwd err", "grad err", "ovf/unf", "w err"]

    def to_markdown(self) -> str:
        out = [f"# dualprec diagnose: {self.model} ({self.backend})", ""]
        out += [f"- {line}" for line in self.summary_lines()]
        out += ["", "| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * len(self.HEADERS)]
        out += ["| " + " | ".join(r) + " |" for r in self.table_rows()]
        out += ["", "*own err*: the error (max of loss and gradient relative error) with only this module "
                "under the policy, minus its children's; *gain*: the policy's error minus its error with this "
                "module promoted alone; *fwd/grad err*: relative error of its output / its parameters' "
                "gradients at step 0; *ovf/unf*: the largest overflow or underflow fraction of its outputs over "
                "the formats it stores them in; *w err*: relative error of its quantized weight.", ""]
        out += ["## Signal-to-noise of each module (dB, step 0)", "",
                "| module | output SQNR | gradient SQNR | amax per step |", "|---|---|---|---|"]
        out += [f"| {m.path} | {_fmt(m.fwd_sqnr_db)} | {_fmt(m.grad_sqnr_db)} | "
                f"{', '.join(_fmt(a) for a in m.amax)} |" for m in self.modules]
        out.append("")
        formats = sorted({f for m in self.modules for f in m.ranges})
        if formats:
            out += ["## Range of each module's outputs (reference values)", "",
                    "| module | " + " | ".join(f"{f} ovf / unf / sub" for f in formats) + " | amax growth |",
                    "|---|" + "---|" * (len(formats) + 1)]
            for m in self.modules:
                cells = [(" / ".join(_fmt(m.ranges[f][k]) for k in ("overflow", "underflow", "subnormal"))
                          if f in m.ranges else "-") for f in formats]
                out.append(f"| {m.path} | " + " | ".join(cells) + f" | {_fmt(m.amax_growth)} |")
            out.append("")
        out += ["## Timings", "", "| phase | seconds |", "|---|---|"]
        out += [f"| {k} | {v:.2f} |" for k, v in self.timings.items()]
        return "\n".join(out) + "\n"

    def render(self, console=None, width: int = 80, limit: int | None = 20) -> None:
        """A rich table (``width`` columns) on ``console`` (a new one on stdout by default)."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console(width=width)
        from .grammar import wrap_policy

        for line in self.summary_lines():
            if line.startswith("suggested: ") and len(line) > width:
                # after top-level commas, never inside a name: the lines join back into the policy
                for part in wrap_policy(line, width, "", "  "):
                    console.print(part, highlight=False, soft_wrap=False, overflow="fold", markup=False)
                continue
            console.print(line, highlight=False, soft_wrap=False, overflow="fold")
        from rich import box

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), header_style="bold")
        for h in self.HEADERS:
            if h == "kind":
                continue
            table.add_column(h, overflow="fold", min_width=12 if h == "module" else None, no_wrap=h != "module",
                             justify="left" if h == "module" else "right")
        for r in self.table_rows(limit):
            table.add_row(*(r[:2] + r[3:]))
        console.print(table)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        x = _unnum(x)
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.1e}"
    return f"{x:.3g}"


def side_by_side(reports: Sequence[DiagnoseReport]) -> list[list[str]]:
    """Rows [module, own error per report, rank per report]: the same module across backends."""
    paths = list(dict.fromkeys(p for r in reports for p in [m.path for m in r.modules]))
    rows = []
    for p in paths:
        row = [p]
        for r in reports:
            try:
                m = r.module(p)
                row += [_fmt(m.own_error), str(m.rank) if m.rank is not None else "-"]
            except KeyError:
                row += ["-", "-"]
        rows.append(row)
    first = reports[0].ranking if reports else []
    rows.sort(key=lambda r: first.index(r[0]) if r[0] in first else len(first))
    return rows


# ----- the search ------------------------------------------------------------------------
def _children(path: str, paths: Iterable[str]) -> list[str]:
    pre = (path + ".") if path else ""
    return [p for p in paths if p.startswith(pre) and p != path and "." not in p[len(pre):]]


def _own(iso: dict[str, float], floor: float) -> dict[str, float]:
    """Each module's isolated error beyond what its direct children explain."""
    own = {}
    for p, e in iso.items():
        kids = [iso[c] for c in _children(p, iso)]
        if not kids:
            own[p] = max(e - floor, 0.0) if math.isfinite(e) else e
        elif not math.isfinite(e):
            own[p] = 0.0 if any(not math.isfinite(k) for k in kids) else math.inf
        else:
            own[p] = max(e - floor - sum(max(k - floor, 0.0) for k in kids if math.isfinite(k)), 0.0)
    return own


def search(run: Callable[[Policy, bool], Trace], policy, modules: Sequence[tuple[str, str]], *,
           target: float = DEFAULT_TARGET, backend: str = "?", model: str = "model", steps: int = 3,
           weights: dict[str, tuple[str, np.ndarray]] | None = None, param_owner: Callable[[str], str] | None = None,
           candidates: Sequence[str] | None = None, gains: bool = True, prune: bool = True,
           log: Callable[[str], None] | None = None) -> DiagnoseReport:
    """Rank ``modules`` ((path, class name), the model's submodules) and suggest a policy.

    ``run(policy, capture)``: the backend's runner (see `Trace`).  ``weights``: module path ->
    (parameter name, float32 weight [out, in]) of the linear layers, for the weight
    quantization error.  ``param_owner``: parameter name -> module path (default: the name
    up to its last dot).  ``candidates``: the module paths the search may promote (default:
    every module the policy runs below 32 bits).  ``gains``: also run the promote-one
    variants (N runs; the ranking does not need them).  ``prune``: after reaching the
    target, drop each promotion the target does not need."""
    policy = Policy.parse(policy)
    if not (isinstance(target, (int, float)) and target > 0 and math.isfinite(target)):
        raise ValueError(f"diagnose: target={target!r} must be a positive number (a relative error, e.g. 0.05)")
    say = log or (lambda s: None)
    owner = param_owner or (lambda n: n.rpartition(".")[0])
    paths = [p for p, _ in modules]
    if candidates is None:
        candidates = [p for p in paths if promotion_kind(policy, p) is not None]
    else:
        unknown = [c for c in candidates if c not in paths]
        if unknown:
            raise ValueError(f"diagnose: candidate modules {unknown} are not modules of this model; "
                             f"modules: {', '.join(paths)}")
    ref_policy = reference_policy(policy)
    timings: dict[str, float] = {}
    runs = 0
    t0 = time.perf_counter()

    failures: dict[str, str] = {}

    def timed(phase, pol, capture=False):
        nonlocal runs
        t = time.perf_counter()
        try:
            tr = run(pol, capture)
        except Exception as e:  # noqa: BLE001 - a variant the backend cannot run counts as broken
            if phase in ("reference", "policy"):
                raise
            failures[str(pol)] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            say(f"  failed: {failures[str(pol)]}")
            tr = Trace([math.nan] * steps, [], [], [True] * steps)
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t
        runs += 1
        return tr

    say(f"reference run ({ref_policy})")
    ref = timed("reference", ref_policy, True)
    say(f"policy run ({policy})")
    base = timed("policy", policy, True)
    loss_err, grad_err = trace_error(base, ref)
    base_err = max(loss_err, grad_err)

    # -- per-module statistics from the two captured runs
    t_stats = time.perf_counter()
    kinds = dict(modules)
    reports: dict[str, ModuleReport] = {}
    for path in paths:
        out_p = [o.get(path) for o in (base.outputs or [])]
        out_r = [o.get(path) for o in (ref.outputs or [])]
        fwd = sq = None
        if out_p and out_p[0] is not None and out_r[0] is not None and np.shape(out_p[0]) == np.shape(out_r[0]):
            fwd, sq = rel_error(out_p[0], out_r[0]), sqnr_db(out_p[0], out_r[0])
        names = [n for n in ref.grads[0] if owner(n) == path or owner(n).startswith(path + ".")] if ref.grads else []
        names = [n for n in names if n in base.grads[0]]
        g = gs = None
        if names and not base.skipped[0]:
            a = np.concatenate([_f64(base.grads[0][n]).ravel() for n in names])
            b = np.concatenate([_f64(ref.grads[0][n]).ravel() for n in names])
            g, gs = rel_error(a, b), sqnr_db(a, b)
        ranges = {}
        ref_vals = [o for o in out_r if o is not None]
        if ref_vals:
            allv = np.concatenate([_f64(o).ravel() for o in ref_vals])
            for fmt in formats_of(policy, path):
                ranges[fmt] = range_fractions(allv if fmt not in ("mxfp8", "nvfp4") else _f64(ref_vals[0]), fmt)
        amax = [float(np.max(np.abs(_f64(o)))) if o is not None and np.size(o) else math.nan for o in out_p]
        growth = (amax[-1] / amax[0]) if len(amax) > 1 and amax[0] and math.isfinite(amax[0]) else None
        wq = None
        if weights and path in weights:
            wq = weight_quant_error(weights[path][1], policy, path)
        reports[path] = ModuleReport(path, kinds[path], promotion_kind(policy, path), fwd, sq, g, gs, ranges,
                                     amax, growth, wq)

    # -- loss scale headroom: how far the scaled parameter gradients are from the compute dtype's limits
    ls = {"enabled": policy.loss_scale.enabled, "scales": base.scales, "skipped": base.skipped,
          "retries": base.retries}
    if policy.loss_scale.enabled:
        big, _, sub = FORMAT_LIMITS.get(policy.compute_dtype, FORMAT_LIMITS["float32"])
        gmax, under, total = 0.0, 0, 0
        for t, gr in enumerate(ref.grads):
            s = base.scales[t] if t < len(base.scales) else 1.0
            for v in gr.values():
                v = np.abs(_f64(v)) * s
                gmax = max(gmax, float(v.max()) if v.size else 0.0)
                nz = v[v != 0]
                under += int((nz < sub / 2).sum())
                total += int(nz.size)
        ls["headroom_bits"] = math.log2(big / gmax) if gmax > 0 else math.inf
        ls["underflow"] = under / total if total else 0.0

    timings["statistics"] = time.perf_counter() - t_stats

    # -- isolated and promoted variants: O(N)
    floor_tr = None
    iso: dict[str, float] = {}
    for i, path in enumerate(candidates):
        say(f"[{i + 1}/{len(candidates)}] {path}")
        iso[path] = error_of(timed("isolated", isolate(policy, path, ref_policy)), ref)
        reports[path].isolated_error = iso[path]
        if gains:
            e = error_of(timed("promoted", promote(policy, path)), ref)
            reports[path].promoted_error = e
            reports[path].gain = (base_err - e) if math.isfinite(base_err) or not math.isfinite(e) else math.inf
    if candidates:
        # the error the reference precision with loss scaling alone leaves (0 without loss scaling)
        if policy.loss_scale.enabled:
            floor_tr = timed("isolated", _replace(ref_policy, loss_scale=policy.loss_scale, nonfinite=policy.nonfinite))
            floor = error_of(floor_tr, ref)
        else:
            floor = 0.0
        own = _own(iso, floor)
        for p, e in own.items():
            reports[p].own_error = e
    ranking = sorted(candidates, key=lambda p: (-_key(reports[p].own_error), -_key(reports[p].gain),
                                                -_key(reports[p].isolated_error), paths.index(p)))
    for r, p in enumerate(ranking, 1):
        reports[p].rank = r

    # -- greedy: promote in ranked order until under the target, then prune
    suggested, sugg_tr, added = policy, base, []
    err = base_err
    if candidates and not err <= target:
        for p in ranking:
            if promotion_kind(suggested, p) is None:
                continue  # covered by a promoted parent
            own_error = reports[p].own_error
            if own_error is not None and own_error <= 0 and (reports[p].gain or 0) <= 0:
                continue
            trial = promote(suggested, p)
            say(f"greedy: + {p}")
            tr = timed("greedy", trial)
            suggested, sugg_tr, err = trial, tr, error_of(tr, ref)
            added.append(p)
            if err <= target:
                break
        if err <= target and prune and len(added) > 1:
            for p in list(added):
                rest = [q for q in added if q != p]
                trial = _minimal(policy, policy, rest)
                say(f"prune: - {p}")
                tr = timed("prune", trial)
                e = error_of(tr, ref)
                if e <= target:
                    added, suggested, sugg_tr, err = rest, trial, tr, e
    s_loss, s_grad = trace_error(sugg_tr, ref)
    timings["total"] = time.perf_counter() - t0
    return DiagnoseReport(
        backend=backend, model=model, policy=str(policy), reference=str(ref_policy), steps=steps,
        target=float(target), loss_error=loss_err, grad_error=grad_err, error=base_err,
        modules=[reports[p] for p in paths], ranking=ranking,
        suggested=str(suggested) if candidates else None,
        suggested_error=max(s_loss, s_grad), suggested_loss_error=s_loss, suggested_grad_error=s_grad,
        meets_target=bool(max(s_loss, s_grad) <= target), overrides_added=added, loss_scale=ls,
        timings=timings, runs=runs, failures=failures,
        losses={"reference": ref.losses, "policy": base.losses, "suggested": sugg_tr.losses})


def _key(x) -> float:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return -math.inf
    return x
