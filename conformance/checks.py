"""The checks: each compares two backends on one (policy, model) and returns Records.

Backend ``a`` is the reference side of the comparison (torch by default), ``b`` the side
under test; errors are b against a.  Bit-exact checks also hold each side against
``dualprec.ref``.  Every check localises what it finds: the first layer, parameter or step
past the tolerance, with abs / rel / ULP errors in the policy's compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from dualprec import Policy
from dualprec.ref import casts as ref_casts
from dualprec.ref import loss_scale as ref_ls

from . import exemptions
from .backends.base import Backend, Optim, Session
from .numerics import bit_equal, diff, dtype_name, first_bit_difference
from .records import Record
from .tolerances import Tolerance, tolerance
from .weights import WeightMap
from .zoo import ModelSpec


@dataclasses.dataclass
class Context:
    """Everything a check needs for one (policy, model) pair."""

    a: Backend
    b: Backend
    spec: ModelSpec
    policy: Policy
    policy_name: str
    weights: dict
    weight_map: WeightMap
    steps: int = 5
    lr: float = 0.05
    overflow_steps: tuple[int, ...] = (1, 4)
    data: Callable | None = None  # step -> (x, y); default: the zoo's seeded batches

    @property
    def tol(self) -> Tolerance:
        return tolerance(self.policy, self.spec.shape)

    def record(self, check, tier, status, **kw) -> Record:
        return Record(self.policy_name, self.spec.name, check, tier, status, **kw)

    def sessions(self, optim: Optim) -> tuple[Session, Session]:
        return tuple(be.session(self.spec, self.policy, self.weights, self.weight_map, optim)
                     for be in (self.a, self.b))

    def batch(self, i: int = 0):
        return self.data(i) if self.data is not None else self.spec.batch(i)


def special_values() -> np.ndarray:
    """Inputs that exercise every cast rule: ties, subnormals, overflow, signed zero, inf, NaN."""
    rng = np.random.default_rng(7)
    normal = (rng.standard_normal(256) * np.exp2(rng.integers(-30, 30, 256))).astype(np.float32)
    one = np.float32(1.0)
    ties = np.array([one + np.float32(2.0**-8), one + np.float32(3 * 2.0**-8), one + np.float32(2.0**-11),
                     one + np.float32(3 * 2.0**-11)], np.float32)  # exact halfway for bf16 / fp16
    edge = np.array([0.0, -0.0, 1e-40, -1e-40, 6e-8, 3e-8, 65504.0, 65520.0, 70000.0, -70000.0,
                     3.4e38, np.inf, -np.inf, np.nan], np.float32)
    return np.concatenate([normal, ties, edge])


# ---------------------------------------------------------------- bit-exact tier
def check_casts(ctx: Context) -> list[Record]:
    x = special_values()
    out = []
    for which, fn_name in (("cast-input", "convert_input"), ("cast-output", "convert_output")):
        got = [getattr(be, fn_name)(ctx.policy, x) for be in (ctx.a, ctx.b)]
        problems, notes = [], []
        for i, (be, g) in enumerate(zip((ctx.a, ctx.b), got)):
            expect = ref_casts.cast(x, dtype_name(g))
            g, absorbed = exemptions.apply(be.name, x, g, expect)
            got[i] = g
            notes += absorbed
            if not bit_equal(g, expect):
                problems.append(f"{be.name} {fn_name} to {dtype_name(g)} is not the reference RNE cast: "
                                f"{first_bit_difference(g, expect)}")
        if not bit_equal(got[0], got[1]):
            problems.append(f"{ctx.a.name} vs {ctx.b.name}: {first_bit_difference(got[0], got[1])}")
        d = diff(got[1], got[0], ctx.policy.compute_dtype)
        out.append(ctx.record(which, "bit-exact", "fail" if problems else "pass", reason="; ".join(problems),
                              max_abs_err=d.max_abs, max_rel_err=d.max_rel, max_ulp_err=d.max_ulp,
                              tolerance=0.0, where=fn_name,
                              detail={"dtype": [dtype_name(g) for g in got], "exemptions": notes}))
    return out


def expected_param_dtype(policy: Policy, name: str) -> str:
    module = name.rsplit(".", 1)[0]
    return policy.for_module(module).param_dtype


def check_params(ctx: Context, sa: Session, sb: Session) -> list[Record]:
    da, db = sa.param_dtypes(), sb.param_dtypes()
    wrong = []
    for name in ctx.weights:
        want = expected_param_dtype(ctx.policy, name)
        for be, d in ((ctx.a, da), (ctx.b, db)):
            if d.get(name) != want:
                wrong.append(f"{be.name} {name}: {d.get(name)} (policy says {want})")
    recs = [ctx.record("param-dtypes", "bit-exact", "fail" if wrong else "pass", reason="; ".join(wrong[:6]),
                       tolerance=0.0, where=wrong[0].split(":")[0] if wrong else None)]
    pa, pb = sa.params(), sb.params()
    bad = [n for n in ctx.weights if not bit_equal(pa[n], pb[n])]
    reason = "; ".join(f"{n}: {first_bit_difference(pb[n], pa[n])}" for n in bad[:4])
    worst = max((diff(pb[n], pa[n], ctx.policy.param_dtype) for n in ctx.weights), key=lambda d: d.max_rel)
    recs.append(ctx.record("param-values", "bit-exact", "fail" if bad else "pass", reason=reason,
                           max_abs_err=worst.max_abs, max_rel_err=worst.max_rel, max_ulp_err=worst.max_ulp,
                           tolerance=0.0, where=bad[0] if bad else None))
    return recs


def check_loss_scale(ctx: Context) -> list[Record]:
    """Adam, ``steps`` steps, overflow injected at ``overflow_steps`` when scaling is dynamic.

    Both sides must skip the same steps, match the reference scale/counter trajectory bit
    for bit, and leave params and Adam's step count untouched on a skipped step."""
    ls = ctx.policy.loss_scale
    inject = set(ctx.overflow_steps) if ls.kind == "dynamic" else set()
    sa, sb = ctx.sessions(Optim("adam", 1e-3))
    problems, traj = [], {"a": [], "b": [], "ref": [], "names": [ctx.a.name, ctx.b.name]}
    state = ref_ls.loss_scale_init(ls)
    where_step = None
    for t in range(ctx.steps):
        x, y = ctx.batch(t)
        mult = math.inf if t in inject else 1.0
        before = [s.params() for s in (sa, sb)]
        infos = [s.train_step(x, y, mult) for s in (sa, sb)]
        state = ref_ls.loss_scale_update(state, not infos[0].skipped, ls)
        traj["ref"].append([float(state.scale), state.counter])
        step_problems = []
        for key, be, s, info, prev in zip("ab", (ctx.a, ctx.b), (sa, sb), infos, before):
            traj[key].append([info.scale, info.counter, info.skipped, info.opt_steps])
            if t in inject and not info.skipped:
                step_problems.append(f"{be.name} stepped through an injected overflow")
            if np.float32(info.scale).tobytes() != np.float32(state.scale).tobytes() or info.counter != state.counter:
                step_problems.append(f"{be.name} scale/counter {info.scale}/{info.counter} != reference "
                                     f"{float(state.scale)}/{state.counter}")
            if info.skipped:
                now = s.params()
                moved = [n for n in prev if not bit_equal(prev[n], now[n])]
                if moved:
                    step_problems.append(f"{be.name} changed {moved[0]} on a skipped step")
        if infos[0].skipped != infos[1].skipped:
            step_problems.append(f"skip decision differs: {ctx.a.name}={infos[0].skipped} {ctx.b.name}={infos[1].skipped}")
        counts = [i.opt_steps for i in infos]
        if None not in counts and counts[0] != counts[1]:
            step_problems.append(f"optimizer step counts differ: {counts}")
        if step_problems and where_step is None:
            where_step = t
        problems += [f"step {t}: {p}" for p in step_problems]
    n_skipped = sum(1 for row in traj["a"] if row[2])
    expected_steps = ctx.steps - n_skipped
    for be, row in ((ctx.a, traj["a"]), (ctx.b, traj["b"])):
        if row[-1][3] is not None and row[-1][3] != expected_steps:
            problems.append(f"{be.name}: Adam step count {row[-1][3]} after {ctx.steps} steps with "
                            f"{n_skipped} skipped (expected {expected_steps})")
    return [ctx.record("loss-scale", "bit-exact", "fail" if problems else "pass", reason="; ".join(problems[:5]),
                       tolerance=0.0, step=where_step, where="loss scale" if problems else None,
                       detail={"trajectory": traj, "injected": sorted(inject)})]


# ---------------------------------------------------------------- tolerance tier
def _worst(named: dict[str, tuple[np.ndarray, np.ndarray]], ulp_dtype: str, tol: float):
    """Per-name diffs; the first name past ``tol`` (in the given order) or else the worst."""
    diffs = {n: diff(b, a, ulp_dtype, tol) for n, (a, b) in named.items()}
    if not diffs:
        return None, None, diffs
    first_bad = next((n for n, d in diffs.items() if not d.ok), None)
    worst = max(diffs, key=lambda n: diffs[n].max_rel)
    return first_bad, worst, diffs


def _tolerance_record(ctx, check, d_main, first_bad, worst, diffs, tol, step=None, extra=""):
    shown = first_bad or worst
    d = diffs[shown] if shown in diffs else d_main
    ok = (d_main is None or d_main.ok) and first_bad is None
    reason = ""
    if not ok:
        dd = diffs.get(first_bad) if first_bad else d_main
        reason = (f"first divergence at {first_bad or check}: max abs {dd.max_abs:.3g}, max rel {dd.max_rel:.3g} "
                  f"({dd.max_ulp:.1f} ULP of {ctx.tol.compute_dtype}) > tol {tol:.3g}"
                  + (f"; {dd.nan_mismatch} non-finite mismatches" if dd.nan_mismatch else "")
                  + (" (shape mismatch)" if not dd.shape_ok else "") + extra)
    top = max([x for x in [d_main, *diffs.values()] if x is not None], key=lambda x: x.max_rel)
    return ctx.record(check, "tolerance", "pass" if ok else "fail", reason=reason, max_abs_err=top.max_abs,
                      max_rel_err=top.max_rel, max_ulp_err=top.max_ulp, tolerance=tol, where=shown, step=step,
                      detail={"per_tensor": {n: {"max_rel": x.max_rel, "max_ulp": x.max_ulp} for n, x in diffs.items()}})


def check_forward(ctx: Context, sa: Session, sb: Session) -> list[Record]:
    x, _ = ctx.batch(0)
    (oa, ia), (ob, ib) = sa.forward(x), sb.forward(x)
    tol = ctx.tol.forward
    named = {n: (ia[n], ib[n]) for n in ia if n in ib}
    missing = sorted(set(ia) ^ set(ib))
    first_bad, worst, diffs = _worst(named, ctx.tol.compute_dtype, tol)
    d_out = diff(ob, oa, ctx.tol.compute_dtype, tol)
    dtype_problem = "" if dtype_name(oa) == dtype_name(ob) else f"output dtype {dtype_name(oa)} vs {dtype_name(ob)}"
    if dtype_problem:
        d_out.tol = -1.0  # force a failure: a different output dtype is a conformance bug
    rec = _tolerance_record(ctx, "forward", d_out, first_bad, worst or "output",
                            diffs or {"output": d_out}, tol, extra=f"; {dtype_problem}" if dtype_problem else "")
    if dtype_problem and not rec.reason.startswith("first"):
        rec.reason = dtype_problem
    rec.detail["bitwise_equal_fraction"] = float(np.mean(np.asarray(oa).astype(np.float64) == np.asarray(ob).astype(np.float64))) if np.shape(oa) == np.shape(ob) else 0.0
    rec.detail["layers_only_in_one_backend"] = missing
    rec.detail["output_dtype"] = [dtype_name(oa), dtype_name(ob)]
    if rec.status == "fail" and first_bad is None and not dtype_problem:
        rec.where = "output"
    return [rec]


def check_grads(ctx: Context, sa: Session, sb: Session) -> list[Record]:
    x, y = ctx.batch(0)
    (la, ga), (lb, gb) = sa.loss_and_grads(x, y), sb.loss_and_grads(x, y)
    tol = ctx.tol.grad
    d_loss = diff(np.float64(lb), np.float64(la), ctx.tol.compute_dtype, ctx.tol.forward)
    # Backprop runs last layer first, so the first divergent gradient is found in reverse order.
    order = list(reversed([n for n in ctx.weights]))
    named = {n: (ga[n], gb[n]) for n in order}
    first_bad, worst, diffs = _worst(named, ctx.tol.compute_dtype, tol)
    diffs_with_loss = {"loss": d_loss, **diffs}
    if not d_loss.ok and first_bad is None:
        first_bad = "loss"
    rec = _tolerance_record(ctx, "gradients", None, first_bad, worst, diffs_with_loss, tol)
    rec.detail["loss"] = [la, lb]
    return [rec]


def check_training(ctx: Context, sa: Session | None = None, sb: Session | None = None) -> list[Record]:
    """SGD for ``ctx.steps`` steps.  ``sa``/``sb`` may be fresh SGD sessions already used by
    the forward/gradient checks (neither changes parameters or optimizer state)."""
    if sa is None or sb is None:
        sa, sb = ctx.sessions(Optim("sgd", ctx.lr))
    tol = ctx.tol
    series = {"loss_a": [], "loss_b": [], "loss_rel": [], "param_rel": [], "tol": []}
    first_bad_step, problem = None, ""
    for t in range(ctx.steps):
        x, y = ctx.batch(t)
        ia, ib = sa.train_step(x, y), sb.train_step(x, y)
        d = diff(np.float64(ib.loss), np.float64(ia.loss), tol.compute_dtype, tol.loss_at(t))
        pa, pb = sa.params(), sb.params()
        prel = max(diff(pb[n], pa[n], tol.compute_dtype).max_rel for n in pa)
        series["loss_a"].append(ia.loss)
        series["loss_b"].append(ib.loss)
        series["loss_rel"].append(d.max_rel)
        series["param_rel"].append(prel)
        series["tol"].append(tol.loss_at(t))
        if not d.ok and first_bad_step is None:
            first_bad_step = t
            problem = (f"loss diverges at step {t}: {ia.loss!r} vs {ib.loss!r}, rel {d.max_rel:.3g} "
                       f"({d.max_ulp:.1f} ULP of {tol.compute_dtype}) > tol {tol.loss_at(t):.3g}")
        if ia.skipped != ib.skipped and first_bad_step is None:
            first_bad_step, problem = t, f"step {t} skipped by one backend only"
    pa, pb = sa.params(), sb.params()
    ptol = tol.params_after(ctx.steps)
    first_bad, worst, diffs = _worst({n: (pa[n], pb[n]) for n in ctx.weights}, tol.compute_dtype, ptol)
    recs = []
    lrec = ctx.record("train-loss", "tolerance", "fail" if problem else "pass", reason=problem,
                      max_abs_err=max(abs(a - b) for a, b in zip(series["loss_a"], series["loss_b"])),
                      max_rel_err=max(series["loss_rel"]), tolerance=tol.loss_at(ctx.steps - 1),
                      where="loss" if problem else None, step=first_bad_step, detail={"series": series})
    lrec.max_ulp_err = max(diff(np.float64(b), np.float64(a), tol.compute_dtype).max_ulp
                           for a, b in zip(series["loss_a"], series["loss_b"]))
    recs.append(lrec)
    prec = _tolerance_record(ctx, "train-params", None, first_bad, worst, diffs, ptol,
                             step=ctx.steps if first_bad else None,
                             extra=f" after {ctx.steps} steps")
    recs.append(prec)
    return recs


# ---------------------------------------------------------------- orchestration
SESSION_CHECKS: dict[str, Callable] = {"params": check_params, "forward": check_forward, "gradients": check_grads}
CHECK_NAMES = ("cast-input", "cast-output", "param-dtypes", "param-values", "forward", "gradients",
               "train-loss", "train-params", "loss-scale")
TIER_OF = {"cast-input": "bit-exact", "cast-output": "bit-exact", "param-dtypes": "bit-exact",
           "param-values": "bit-exact", "loss-scale": "bit-exact", "forward": "tolerance",
           "gradients": "tolerance", "train-loss": "tolerance", "train-params": "tolerance",
           "quant-codes": "bit-exact", "fp8-scales": "bit-exact"}


def _guard(ctx: Context, names: tuple[str, ...], fn: Callable, *args) -> list[Record]:
    """Run a check; an exception in a backend is a failure of those checks, not a crash."""
    t0 = time.perf_counter()
    try:
        recs = fn(*args)
    except Exception as e:  # noqa: BLE001 - every backend error becomes a visible failure record
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        recs = [ctx.record(n, TIER_OF[n], "fail", reason=f"raised {msg}") for n in names]
    dt = (time.perf_counter() - t0) / max(len(recs), 1)
    for r in recs:
        r.seconds = dt
    return recs


def run_checks(ctx: Context) -> list[Record]:
    """All checks of one (policy, model), skip records for what cannot run here."""
    reasons = [f"{be.name}: {r}" for be in (ctx.a, ctx.b) if (r := be.unsupported(ctx.policy))]
    extra = extra_checks(ctx.policy)
    if reasons:
        return [ctx.record(n, TIER_OF[n], "skip", reason="; ".join(reasons)) for n in CHECK_NAMES + extra]
    recs = _guard(ctx, ("cast-input", "cast-output"), check_casts, ctx)

    # One SGD session pair serves the parameter, forward, gradient and training checks:
    # forward and loss_and_grads leave parameters, optimizer and loss-scale state as they
    # were.  Should any of them raise, training gets a fresh pair instead.
    shared: list = []

    def session_checks():
        sa, sb = ctx.sessions(Optim("sgd", ctx.lr))
        out = check_params(ctx, sa, sb)
        out += _guard(ctx, ("forward",), check_forward, ctx, sa, sb)
        out += _guard(ctx, ("gradients",), check_grads, ctx, sa, sb)
        if not any(r.reason.startswith("raised ") for r in out if r.status == "fail"):
            shared.extend((sa, sb))
        return out

    recs += _guard(ctx, ("param-dtypes", "param-values", "forward", "gradients"), session_checks)
    recs += _guard(ctx, ("train-loss", "train-params"), check_training, ctx, *shared)
    recs += _guard(ctx, ("loss-scale",), check_loss_scale, ctx)
    for n in extra:
        recs.append(ctx.record(n, TIER_OF[n], "skip",
                               reason=f"neither backend exposes {n} for comparison yet"))
    return recs


def extra_checks(policy: Policy) -> tuple[str, ...]:
    out = ()
    if any(p.quantization for p in (policy, *(s for _, s in policy.overrides))):
        out += ("quant-codes",)
    if any(p.fp8 for p in (policy, *(s for _, s in policy.overrides))):
        out += ("fp8-scales",)
    return out
