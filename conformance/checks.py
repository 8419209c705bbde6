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
import zlib
from typing import Callable

import numpy as np

from dualprec import Policy
from dualprec.ref import casts as ref_casts
from dualprec.ref import loss_scale as ref_ls

from . import exemptions
from .backends.base import Backend, Optim, Session
from .numerics import bit_equal, diff, dtype_name, first_bit_difference, measure, ulp
from .records import Record
from .tolerances import Tolerance, activation_code_step, chain_bound, layer_bound, tolerance
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
    loss_scale_steps: int = 6  # with growth_interval 2: growth at step 3, backoffs at 1 and 4
    seed: int = 0  # data seed (the weights' seed is the caller's)
    data: Callable | None = None  # step -> (x, y); default: the zoo's seeded batches
    math_mode: str = "ieee"  # how both backends compute float32 matmuls (tolerances.MATH_MODES)

    @property
    def tol(self) -> Tolerance:
        return tolerance(self.policy, self.spec.shape, self.math_mode, activation_code_step(self.policy))

    @property
    def quantized_activations(self) -> bool:
        """LLM.int8 quantizes activations: a one-ULP difference upstream of a layer can move an
        int8 code and so the layer's output by a code step (no share criterion there)."""
        return any(p.quantization and p.quantization.mode.startswith("int8")
                   for p in (self.policy, *(s for _, s in self.policy.overrides)))

    def record(self, check, tier, status, **kw) -> Record:
        return Record(self.policy_name, self.spec.name, check, tier, status, **kw)

    def sessions(self, optim: Optim) -> tuple[Session, Session]:
        return tuple(be.session(self.spec, self.policy, self.weights, self.weight_map, optim)
                     for be in (self.a, self.b))

    def batch(self, i: int = 0):
        return self.data(i) if self.data is not None else self.spec.batch(1000 * self.seed + i)


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


def float_names(ctx: Context, sa: Session, sb: Session) -> list[str]:
    """The canonical weights both sides hold as float parameters: all of them but the frozen
    quantized codes (which have no float value, no gradient and no update; quant-codes
    compares those)."""
    frozen = sa.quant_frozen() | sb.quant_frozen()
    return [n for n in ctx.weights if n not in frozen]


def check_params(ctx: Context, sa: Session, sb: Session) -> list[Record]:
    da, db = sa.param_dtypes(), sb.param_dtypes()
    wrong = []
    names = float_names(ctx, sa, sb)
    for name in names:
        want = expected_param_dtype(ctx.policy, name)
        for be, d in ((ctx.a, da), (ctx.b, db)):
            if d.get(name) != want:
                wrong.append(f"{be.name} {name}: {d.get(name)} (policy says {want})")
    recs = [ctx.record("param-dtypes", "bit-exact", "fail" if wrong else "pass", reason="; ".join(wrong[:6]),
                       tolerance=0.0, where=wrong[0].split(":")[0] if wrong else None)]
    pa, pb = sa.params(), sb.params()
    bad = [n for n in names if not bit_equal(pa[n], pb[n])]
    reason = "; ".join(f"{n}: {first_bit_difference(pb[n], pa[n])}" for n in bad[:4])
    worst = max((diff(pb[n], pa[n], ctx.policy.param_dtype) for n in names), key=lambda d: d.max_rel)
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
    n_steps = max(ctx.steps, ctx.loss_scale_steps) if inject else ctx.steps
    sa, sb = ctx.sessions(Optim("adam", 1e-3))
    problems, traj = [], {"a": [], "b": [], "ref": [], "names": [ctx.a.name, ctx.b.name]}
    state = ref_ls.loss_scale_init(ls)
    where_step = None
    for t in range(n_steps):
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
    expected_steps = n_steps - n_skipped
    for be, row in ((ctx.a, traj["a"]), (ctx.b, traj["b"])):
        if row[-1][3] is not None and row[-1][3] != expected_steps:
            problems.append(f"{be.name}: Adam step count {row[-1][3]} after {n_steps} steps with "
                            f"{n_skipped} skipped (expected {expected_steps})")
    return [ctx.record("loss-scale", "bit-exact", "fail" if problems else "pass", reason="; ".join(problems[:5]),
                       tolerance=0.0, step=where_step, where="loss scale" if problems else None,
                       detail={"trajectory": traj, "injected": sorted(inject)}),
            check_optimizer_dtypes(ctx, sa, sb)]


# ---------------------------------------------------------------- dtype flow
MATMUL_KINDS = {"Linear", "Conv1d", "Conv2d", "Conv3d", "Bilinear",
                "QuantLinear4bit", "QuantLinear8bit", "Linear4bit", "Linear8bitLt"}  # bitsandbytes' Linears
NORM_KINDS = {"LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "InstanceNorm2d"}


def predicted_output_dtype(policy: Policy, name: str, kind: str) -> str | None:
    """What the op policy says a submodule's output dtype is (None: no prediction): matmul-like
    layers round to the compute dtype; norms stay in float32 (float64) under mixed policies,
    as autocast's fp32 list does, and round to the compute dtype under "true" ones; a module
    where an override starts hands its output back in the override's output dtype."""
    sub = policy.for_module(name)
    if name and sub != policy.for_module(name.rpartition(".")[0]):
        return sub.output_dtype
    if kind in MATMUL_KINDS:
        return sub.compute_dtype
    if kind in NORM_KINDS:
        if sub.is_mixed:
            return "float64" if sub.compute_dtype == "float64" else "float32"
        return sub.compute_dtype
    return None


def check_dtype_flow(ctx: Context, sa: Session, sb: Session, fwd: tuple, grads: tuple) -> list[Record]:
    """Bit-exact: the dtype of the output, of every named intermediate output and of every
    gradient, the same in both backends and what the policy predicts."""
    (oa, ia), (ob, ib) = fwd
    problems, checked = [], 0
    try:
        kinds = sa.module_kinds()
    except NotImplementedError:
        kinds = {}
    want_out = ctx.policy.output_dtype
    for be, o in ((ctx.a, oa), (ctx.b, ob)):
        if dtype_name(o) != want_out:
            problems.append(f"output: {be.name} {dtype_name(o)} (policy says {want_out})")
    for n in ia:
        if n not in ib:
            continue
        checked += 1
        da, db = dtype_name(ia[n]), dtype_name(ib[n])
        want = predicted_output_dtype(ctx.policy, n, kinds.get(n, ""))
        if da != db:
            problems.append(f"{n}: {ctx.a.name} {da} vs {ctx.b.name} {db}" + (f" (policy says {want})" if want else ""))
        elif want and da != want:
            problems.append(f"{n}: both {da} (policy says {want})")
    ga, gb = grads
    for n in ctx.weights:
        if n not in ga or n not in gb:
            continue
        checked += 1
        want = expected_param_dtype(ctx.policy, n)
        if ga[n] != gb[n] or ga[n] != want:
            problems.append(f"grad {n}: {ctx.a.name} {ga[n]} vs {ctx.b.name} {gb[n]} (param dtype {want})")
    return [ctx.record("dtype-flow", "bit-exact", "fail" if problems else "pass", reason="; ".join(problems[:5]),
                       tolerance=0.0, where=problems[0].split(":")[0] if problems else None,
                       detail={"checked": checked, "problems": problems})]


def check_optimizer_dtypes(ctx: Context, sa: Session, sb: Session) -> Record:
    """Bit-exact: Adam's state tensors have the dtype of the weights the optimizer updates
    (float32 masters with master weights, else the parameter's dtype), in both backends."""
    try:
        da, db = sa.optimizer_state_dtypes(), sb.optimizer_state_dtypes()
    except NotImplementedError:
        return ctx.record("optimizer-dtypes", "bit-exact", "skip", reason="a backend does not expose its optimizer state")
    problems = []
    for name in sorted(set(da) | set(db)):
        param = name.rsplit(".", 1)[0]
        want = "float32" if ctx.policy.master_weights and param in ctx.weights else (
            expected_param_dtype(ctx.policy, param) if param in ctx.weights else None)
        a, b = da.get(name), db.get(name)
        if a != b or (want and a != want):
            problems.append(f"{name}: {ctx.a.name} {a} vs {ctx.b.name} {b}" + (f" (expected {want})" if want else ""))
    return ctx.record("optimizer-dtypes", "bit-exact", "fail" if problems else "pass", reason="; ".join(problems[:5]),
                      tolerance=0.0, where=problems[0].split(":")[0] if problems else None,
                      detail={"checked": len(da)})


# ---------------------------------------------------------------- tolerance tier
def judge_tensors(ctx: Context, check: str, named: dict, bound_of: Callable, step=None, extra="") -> Record:
    """One tolerance record over named (reference, got) pairs, in the given order.

    Each tensor is measured (numerics.measure) and judged against ``bound_of(name, stats)``,
    a :class:`tolerances.Bound` derived from the arithmetic (see tolerances.py).  The first
    tensor past its bound is ``where``; the detail keeps every tensor's stats and bound."""
    per, first_bad, why = {}, None, ""
    tol_shown = None
    for n, (ra, gb) in named.items():
        st = measure(gb, ra)
        bound = bound_of(n, st)
        problem = bound.judge(st)
        per[n] = dict(st.to_dict(), bound=bound.to_dict())
        if tol_shown is None:
            tol_shown = bound.shown
        if problem and first_bad is None:
            first_bad, why = n, problem
            tol_shown = bound.shown
    sizes = sum(v["size"] for v in per.values()) or 1
    equal = sum(v["size"] * (1 - v["neq_frac"]) for v in per.values()) / sizes
    top_ulp = max((v["max_ulp"] for v in per.values()), default=0.0)
    top_rel = max((v["max_rel"] for v in per.values()), default=0.0)
    worst = max(per, key=lambda n: per[n]["max_ulp"]) if per else None
    reason = f"first divergence at {first_bad}: {why}{extra}" if first_bad else ""
    rec = ctx.record(check, "tolerance", "fail" if first_bad else "pass", reason=reason, max_rel_err=top_rel,
                     max_ulp_err=top_ulp, tolerance=tol_shown or 0.0, where=first_bad or worst, step=step,
                     detail={"per_tensor": per, "bitwise_equal_fraction": equal, "math_mode": ctx.math_mode})
    rec.max_abs_err = None
    return rec


def _chain(rel: float, why: str) -> Callable:
    return lambda name, st: chain_bound(rel, why)


def _scalar(v, policy: Policy):
    return np.asarray(v, np.float64 if policy.needs_x64 else np.float32)


def _leaves(names) -> list[str]:
    """Named submodules without named children (the layers a layer-isolated check runs)."""
    names = list(names)
    return [n for n in names if not any(m.startswith(n + ".") for m in names)]


#: layers whose reduction is the length of their 1-D weight (the normalised width)
WIDTH_NORMS = {"LayerNorm", "RMSNorm"}


def reduction_length(ctx: Context, name: str, kinds: dict) -> int:
    """The longest reduction of one leaf layer: a Linear's or a convolution's fan-in (its
    weight's shape past the first axis), a LayerNorm's or RMSNorm's width; the model's
    longest (``ModelShape.n_reduce``) for any other layer (a GroupNorm also sums over space)."""
    w = ctx.weights.get(f"{name}.weight")
    kind = kinds.get(name, "")
    if w is None or kind in ("Embedding",):
        return ctx.spec.shape.n_reduce
    if np.ndim(w) >= 2:
        return int(np.prod(np.shape(w)[1:]))
    if kind in WIDTH_NORMS:
        return int(np.shape(w)[0])
    return ctx.spec.shape.n_reduce


def check_forward(ctx: Context, sa: Session, sb: Session, fwd=None) -> list[Record]:
    x, _ = ctx.batch(0)
    (oa, ia), (ob, ib) = fwd or (sa.forward(x), sb.forward(x))
    named = {n: (ia[n], ib[n]) for n in ia if n in ib}
    named["output"] = (oa, ob)
    rec = judge_tensors(ctx, "forward", named, _chain(ctx.tol.forward, "forward chain bound"))
    rec.detail["layers_only_in_one_backend"] = sorted(set(ia) ^ set(ib))
    rec.detail["output_dtype"] = [dtype_name(oa), dtype_name(ob)]
    return [rec]


def check_layers(ctx: Context, sa: Session, sb: Session, fwd) -> list[Record]:
    """Each named submodule of ``b`` run on the very input ``a``'s submodule got, against
    ``a``'s output: divergence cannot accumulate, so a few ULP is all a correct pair may
    differ by.  (Blocks with submodules are run with only their own input shared.)"""
    x, _ = ctx.batch(0)
    (_, ia), _ = fwd
    try:
        inputs = sa.layer_inputs()
    except NotImplementedError:
        return [ctx.record("layers", "tolerance", "skip", reason=f"{ctx.a.name} does not expose layer inputs")]
    inputs = {n: inputs[n] for n in ia if n in inputs}
    try:
        got = sb.run_layers(x, inputs)
    except NotImplementedError:
        return [ctx.record("layers", "tolerance", "skip", reason=f"{ctx.b.name} cannot run layers in isolation")]
    named = {n: (ia[n], got[n]) for n in inputs if n in got}
    leaves = set(_leaves(named))
    own = _own_ops(sb, x, {n: inputs[n] for n in named if n not in leaves}, ia)
    named = {k: v for n, pair in named.items()
             for k, v in [(n, pair)] + ([(n + OWN_OPS, (ia[n], own[n]))] if n in own else [])}
    try:
        kinds = sa.module_kinds()
    except NotImplementedError:
        kinds = {}

    def bound_of(name, st):
        k = reduction_length(ctx, name, kinds) if name in leaves else ctx.spec.shape.n_reduce
        shape = dataclasses.replace(ctx.spec.shape, n_reduce=k)
        return layer_bound(ctx.policy, shape, st.dtype, st.size, leaf=name in leaves,
                           math_mode=ctx.math_mode, share=not ctx.quantized_activations,
                           code_step=activation_code_step(ctx.policy), own_ops=name.endswith(OWN_OPS))

    rec = judge_tensors(ctx, "layers", named, bound_of)
    rec.detail["not_isolated"] = sorted(set(inputs) - set(got))
    return [rec]


#: the suffix of a block's own-ops entry in the layers record ("blocks.0.mlp (own ops)")
OWN_OPS = " (own ops)"


def _own_ops(sb: Session, x, block_inputs: dict, outputs: dict) -> dict:
    """Each block run on the reference's input with its direct children returning the
    reference's outputs (``Session.run_glue``), one pass per nesting level (a block is
    another's child); {} when the backend cannot."""
    names = list(outputs)
    got = {}
    blocks = list(block_inputs)
    depth = {b: sum(1 for c in blocks if b.startswith(c + ".")) for b in blocks}
    for level in sorted(set(depth.values())):
        sel = [b for b in blocks if depth[b] == level]
        children = {}
        for b in sel:
            inside = [n for n in names if n.startswith(b + ".")]
            children.update({n: outputs[n] for n in inside
                             if not any(n.startswith(m + ".") for m in inside)})
        try:
            got.update(sb.run_glue(x, {b: block_inputs[b] for b in sel}, children))
        except NotImplementedError:
            return {}
    return got


def check_grads(ctx: Context, sa: Session, sb: Session, lg=None, fwd=None) -> list[Record]:
    x, y = ctx.batch(0)
    (la, ga), (lb, gb) = lg or (sa.loss_and_grads(x, y), sb.loss_and_grads(x, y))
    # Backprop runs last layer first, so the first divergent gradient is found in reverse order.
    named = {"loss": (_scalar(la, ctx.policy), _scalar(lb, ctx.policy))}
    named.update({n: (ga[n], gb[n]) for n in reversed(float_names(ctx, sa, sb))})
    rec = judge_tensors(ctx, "gradients", named, _chain(ctx.tol.grad, "gradient chain bound"))
    rec.detail["loss"] = [la, lb]
    out = [rec]
    if fwd is not None:
        out.append(check_loss_consistency(ctx, (la, lb), (fwd[0][0], fwd[1][0]), y))
    return out


def cross_entropy64(logits, labels, class_axis: int = 1) -> float:
    """The mean cross-entropy of integer labels, in float64 (the reference of the loss);
    ``class_axis``: where a >2-D output holds the classes (torch's 1, LM logits -1)."""
    z = np.asarray(logits, np.float64).reshape(len(labels), -1) if np.ndim(logits) == 2 else \
        np.moveaxis(np.asarray(logits, np.float64), class_axis, -1).reshape(-1, np.shape(logits)[class_axis])
    lab = np.asarray(labels).reshape(-1)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(lab)), lab]))


def check_loss_consistency(ctx: Context, losses, outputs, y) -> Record:
    """Each side's loss against a float64 cross-entropy of that side's own model output:
    the loss is a float32 (float64) reduction of the output, so it may differ from the
    float64 value only by a reduction's rounding, on any machine.  Catches a loss computed
    in half precision or from rounded logits, whatever the two sides' outputs agree on."""
    problems, detail = [], {}
    u = 2.0 ** -24
    for be, loss, out in zip((ctx.a, ctx.b), losses, outputs):
        z = np.asarray(out, np.float64)
        axis = ctx.spec.class_axis if z.ndim > 2 else 1
        ref = cross_entropy64(z, y, axis)
        n_class = z.shape[axis] if z.ndim >= 2 else 1
        bound = 8 * u * (math.sqrt(n_class) * (float(np.max(np.abs(z))) + math.log(max(n_class, 2)))
                         + math.sqrt(z.size / max(n_class, 1)) * abs(ref) + 1.0)
        err = abs(float(loss) - ref)
        detail[be.name] = {"loss": float(loss), "float64": ref, "err": err, "bound": bound}
        if not math.isfinite(err) or err > bound:
            problems.append(f"{be.name} loss {float(loss)!r} vs float64 cross-entropy of its own output "
                            f"{ref!r}: error {err:.3g} > bound {bound:.3g}")
    return ctx.record("loss", "tolerance", "fail" if problems else "pass", reason="; ".join(problems),
                      max_abs_err=max(d["err"] for d in detail.values()),
                      tolerance=max(d["bound"] for d in detail.values()),
                      where=problems[0].split()[0] if problems else None, detail=detail)


def check_training(ctx: Context, sa: Session | None = None, sb: Session | None = None) -> list[Record]:
    """SGD for ``ctx.steps`` steps.  ``sa``/``sb`` may be fresh SGD sessions already used by
    the forward/gradient checks (neither changes parameters or optimizer state)."""
    if sa is None or sb is None:
        sa, sb = ctx.sessions(Optim("sgd", ctx.lr))
    tol = ctx.tol
    series = {"loss_a": [], "loss_b": [], "loss_rel": [], "param_rel": [], "tol": []}
    losses, skip_problem = {}, None
    names = float_names(ctx, sa, sb)
    before = [(s.params(), s.loss_and_grads(*ctx.batch(0))[1]) for s in (sa, sb)]
    update_rec = None
    for t in range(ctx.steps):
        x, y = ctx.batch(t)
        ia, ib = sa.train_step(x, y), sb.train_step(x, y)
        if t == 0:
            update_rec = check_update(ctx, names, before, (sa.params(), sb.params()), (ia.skipped, ib.skipped))
        losses[f"step {t}"] = (_scalar(ia.loss, ctx.policy), _scalar(ib.loss, ctx.policy))
        pa, pb = sa.params(), sb.params()
        series["loss_a"].append(ia.loss)
        series["loss_b"].append(ib.loss)
        series["loss_rel"].append(diff(np.float64(ib.loss), np.float64(ia.loss)).max_rel)
        series["param_rel"].append(max(diff(pb[n], pa[n]).max_rel for n in pa))
        series["tol"].append(tol.loss_at(t))
        if ia.skipped != ib.skipped and skip_problem is None:
            skip_problem = f"; step {t} skipped by one backend only"
    lrec = judge_tensors(ctx, "train-loss", losses,
                         lambda name, st: chain_bound(tol.loss_at(int(name.split()[1])), "trajectory bound"),
                         extra=skip_problem or "")
    if skip_problem and lrec.status == "pass":
        lrec.status, lrec.reason = "fail", skip_problem[2:]
    if lrec.where and lrec.where.startswith("step "):
        lrec.step = int(lrec.where.split()[1]) if lrec.status == "fail" else None
    lrec.detail["series"] = series
    pa, pb = sa.params(), sb.params()
    prec = judge_tensors(ctx, "train-params", {n: (pa[n], pb[n]) for n in float_names(ctx, sa, sb)},
                         _chain(tol.params_after(ctx.steps), f"trajectory bound after {ctx.steps} steps"),
                         extra=f" after {ctx.steps} steps")
    if prec.status == "fail":
        prec.step = ctx.steps
    return [lrec, prec, update_rec]


def check_update(ctx: Context, names, before, after, skipped) -> Record:
    """Each side's first SGD step against SGD applied, in float64, to that side's own
    (unscaled) gradient of the same batch from the same parameters: p1 = p0 - lr * g, rounded
    to the parameter dtype (through float32 masters where the policy keeps them); p1 = p0 on a
    skipped step.  A self-consistency check, so it holds on every machine: it allows 2 ULP of
    the parameter plus 4 float32 roundings of the update, and catches an update that uses
    other gradients than the backend's own (a badly unscaled gradient, master weights not
    copied back, a step applied twice)."""
    problems, worst = [], 0.0
    u32 = 2.0 ** -24
    for be, (p0, g0), p1, skip in zip((ctx.a, ctx.b), before, after, skipped):
        for n in names:
            if n not in g0:
                continue
            old = np.asarray(p0[n]).astype(np.float64)
            step = 0.0 if skip else ctx.lr * np.asarray(g0[n]).astype(np.float64)
            want = old - step
            got = np.asarray(p1[n]).astype(np.float64)
            pd = dtype_name(p1[n])
            allowed = 2 * ulp(np.maximum(np.abs(want), np.abs(old)), pd if pd in ("float64", "float32", "bfloat16",
                                                                                  "float16") else "float32") \
                + 4 * u32 * np.abs(step) + 1e-45
            ratio = float(np.max(np.abs(got - want) / allowed)) if got.size else 0.0
            worst = max(worst, ratio)
            if not np.all(np.isfinite(got) == np.isfinite(want)) or ratio > 1.0:
                i = int(np.argmax(np.abs(got - want) / allowed))
                problems.append(f"{be.name} {n}: updated to {got.reshape(-1)[i]!r}, SGD of its own gradient "
                                f"gives {want.reshape(-1)[i]!r} ({ratio:.3g}x the allowed rounding)")
                break
    return ctx.record("update", "tolerance", "fail" if problems else "pass", reason="; ".join(problems[:2]),
                      tolerance=1.0, max_ulp_err=worst, step=0 if problems else None,
                      where=problems[0].split(":")[0] if problems else None,
                      detail={"worst_ratio": worst, "problems": problems})


# ---------------------------------------------------------------- quantized and FP8 state
def predicted_frozen(ctx: Context, kinds: dict[str, str]) -> set[str]:
    """The weights the policy turns into frozen quantized codes: those of the linear layers
    (a 2-D weight; the layer kind is the quantized one by now) whose path it quantizes, in any
    mode but int8-training (which keeps a trainable weight)."""
    out = set()
    for n in ctx.weights:
        module, _, leaf = n.rpartition(".")
        if leaf != "weight" or np.ndim(ctx.weights[n]) != 2 or kinds.get(module) == "Embedding":
            continue
        if not ctx.policy.quantizes(module):
            continue
        if ctx.policy.for_module(module).quantization.mode != "int8-training":
            out.add(n)
    return out


def _layer_of(key: str) -> str:
    """The module path of a bitsandbytes state key ("fc1.weight.absmax" -> "fc1")."""
    for marker in (".weight", ".SCB"):
        if marker in key:
            return key[:key.index(marker)]
    return key.rpartition(".")[0]


def _byte_problems(name_a: str, name_b: str, ta: dict, tb: dict, what: str) -> list[str]:
    problems = []
    for k in sorted(set(ta) ^ set(tb)):
        problems.append(f"{what} {k}: only in {name_a if k in ta else name_b}")
    for k in sorted(set(ta) & set(tb)):
        a, b = np.asarray(ta[k]), np.asarray(tb[k])
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{what} {k}: {name_a} {a.dtype}{list(a.shape)} vs {name_b} {b.dtype}{list(b.shape)}")
        elif np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes():
            if _derived_table_equal(k, a, b) or (what == "dequantized" and _equal_but_zero_sign(a, b)):
                continue
            problems.append(f"{what} {k}: {first_bit_difference(b, a)}")
    return problems


def _equal_but_zero_sign(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaNs by mask, +0.0 == -0.0: bitsandbytes itself dequantizes FP4's code 8
    to -0.0 in its scalar and CUDA kernels and to +0.0 in its AVX512 one."""
    af, bf = a.astype(np.float64), b.astype(np.float64)
    return bool(np.all((af == bf) | (np.isnan(af) & np.isnan(bf))))


def _derived_table_equal(key: str, a: np.ndarray, b: np.ndarray) -> bool:
    """A code book (``quant_map``) within one float32 ULP of its largest entry: bitsandbytes builds its 8-bit dynamic
    map with torch arithmetic whose last bit depends on ATen's CPU kernels
    (``ATEN_CPU_CAPABILITY=default`` moves 42 of its 256 entries by one ULP).  The codes and
    absmax made with it are still compared bit for bit."""
    if not key.endswith("quant_map") or a.dtype.kind != "f":
        return False
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    gap = np.abs(a32.astype(np.float64) - b32.astype(np.float64))
    scale = np.float32(max(float(np.max(np.abs(a32), initial=0)), float(np.max(np.abs(b32), initial=0))))
    return bool(np.all(gap <= float(np.spacing(scale))))  # one ULP at the table's scale


def check_quant(ctx: Context, sa: Session, sb: Session, before: tuple | None = None) -> list[Record]:
    """Bit-exact, after the training steps: each side quantized the same layers and froze
    them (no gradient, codes unchanged since ``before``: the state right after the sessions
    were built); the quantized state in bitsandbytes' layout (packed codes, absmax, nested
    absmax, quant_map, the quant_state JSON, int8 codes and SCB; int8-training: the codes of
    the current weight) is byte-identical between the backends, and so are the dequantized
    weights."""
    try:
        qa, qb = sa.quant_state(), sb.quant_state()
        wa, wb = sa.dequantized(), sb.dequantized()
    except NotImplementedError:
        return [ctx.record("quant-codes", "bit-exact", "skip", reason="a backend does not expose its quantized state")]
    try:
        kinds = sa.module_kinds()
    except NotImplementedError:
        kinds = {}
    want = predicted_frozen(ctx, kinds)
    problems = []
    for be, s in ((ctx.a, sa), (ctx.b, sb)):
        got = s.quant_frozen()
        if got != want:
            problems.append(f"{be.name} froze {sorted(got)}, the policy quantizes {sorted(want)}")
        if s.frozen_with_grad():
            problems.append(f"{be.name}: frozen quantized weights got a gradient: {s.frozen_with_grad()}")
    if not qa and not qb:
        problems.append("neither backend holds quantized state")
    frozen_layers = {n.rpartition(".")[0] for n in want}

    def frozen_only(t):
        return {k: v for k, v in t.items() if _layer_of(k) in frozen_layers}

    if before is not None:
        # all of it before training (int8-training's codes come from weights that then train
        # and may drift apart within the tolerance tier); the frozen layers after training too
        problems += _byte_problems(ctx.a.name, ctx.b.name, before[0], before[1], "state")
        problems += _byte_problems(ctx.a.name, ctx.b.name, frozen_only(qa), frozen_only(qb), "trained state")
        for be, now, then in ((ctx.a, qa, before[0]), (ctx.b, qb, before[1])):
            problems += [f"{be.name} changed a frozen layer in training: {p}"
                         for p in _byte_problems("now", "before", frozen_only(now), frozen_only(then), "state")]
    else:
        problems += _byte_problems(ctx.a.name, ctx.b.name, qa, qb, "state")
    problems += _byte_problems(ctx.a.name, ctx.b.name, wa, wb, "dequantized")
    layers = sorted({_layer_of(k) for k in qa})
    return [ctx.record("quant-codes", "bit-exact", "fail" if problems else "pass", reason="; ".join(problems[:4]),
                       tolerance=0.0, where=problems[0].split(":")[0] if problems else None,
                       step=ctx.steps if before is not None else None,
                       detail={"layers": layers, "frozen": sorted(want), "tensors": len(qa),
                               "bytes": int(sum(np.asarray(v).nbytes for v in qa.values())),
                               "dequantized": sorted(wa), "problems": problems})]


def _fp8_key(key: str) -> tuple[str, str, str] | None:
    """``fp8.<layer>.<role>.<field>`` -> (layer, role, field); None for other state (a
    block-scaled layer's seed and step)."""
    head, _, field = key.rpartition(".")
    layer, _, role = head.rpartition(".")
    return (layer, role, field) if role in _FP8_ROLES and field in ("scale", "amax_history") else None


_FP8_ROLES = ("input", "weight", "grad_output")


def check_fp8(ctx: Context, sa: Session, sb: Session, steps: int | None = None) -> list[Record]:
    """The FP8 state of every layer after ``steps`` training steps from the same weights (the
    matrix uses one), under the same flat names in both backends.

    What the arithmetic fixes is compared bit for bit: the weight's amax history and scale
    (the same parameters), a block-scaled layer's seed and step, and each scale wherever the
    two sides recorded the same amax history (the recipe is a function of it: a wrong margin,
    reduction or scale one step late differs here).  The amaxes of activations and output
    gradients come out of the chained forward and backward, whose values may differ by their
    summation orders (an amax one rounding apart moves its scale by as much): those histories
    and their scales are held to the forward and gradient chain bounds, relative."""
    try:
        fa, fb = sa.fp8_state(), sb.fp8_state()
    except NotImplementedError:
        return [ctx.record("fp8-scales", "bit-exact", "skip", reason="a backend does not expose its FP8 state")]
    if not fa and not fb:
        recipes = {str(p.fp8.scaling) for p in (ctx.policy, *(o for _, o in ctx.policy.overrides)) if p.fp8}
        if recipes == {"current"}:
            return [ctx.record("fp8-scales", "bit-exact", "skip",
                               reason="current scaling keeps no FP8 state (its scales come from each tensor)")]
        return [ctx.record("fp8-scales", "bit-exact", "fail", reason="neither backend holds FP8 state")]
    problems = [f"fp8 {k}: only in {ctx.a.name if k in fa else ctx.b.name}" for k in sorted(set(fa) ^ set(fb))]
    exact, chained = {}, {}
    for k in sorted(set(fa) & set(fb)):
        parsed = _fp8_key(k)
        if parsed is None or parsed[1] == "weight":
            exact[k] = (fa[k], fb[k])
            continue
        layer, role, field = parsed
        hist = f"{layer}.{role}.amax_history"
        same_history = hist in fa and hist in fb and \
            np.ascontiguousarray(fa[hist]).tobytes() == np.ascontiguousarray(fb[hist]).tobytes()
        if field == "scale" and same_history:
            exact[k] = (fa[k], fb[k])
        else:
            chained[k] = (role, fa[k], fb[k])
    problems += _byte_problems(ctx.a.name, ctx.b.name, {k: v[0] for k, v in exact.items()},
                               {k: v[1] for k, v in exact.items()}, "fp8")
    worst = 0.0
    for k, (role, a, b) in chained.items():
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            problems.append(f"fp8 {k}: {ctx.a.name} {list(a.shape)} vs {ctx.b.name} {list(b.shape)}")
            continue
        bound = ctx.tol.forward if role == "input" else ctx.tol.grad
        both = np.isfinite(a) & np.isfinite(b)
        if not np.array_equal(np.isfinite(a), np.isfinite(b)):
            problems.append(f"fp8 {k}: non-finite in one backend only")
            continue
        rel = np.abs(a - b)[both] / np.maximum(np.maximum(np.abs(a), np.abs(b))[both], np.finfo(np.float32).tiny)
        top = float(rel.max()) if rel.size else 0.0
        worst = max(worst, top)
        if top > bound:
            problems.append(f"fp8 {k}: rel {top:.3g} > {role} chain bound {bound:.3g}")
    status, reason = ("fail" if problems else "pass"), "; ".join(problems[:4])
    return [ctx.record("fp8-scales", "bit-exact", status, reason=reason, max_rel_err=worst,
                       tolerance=0.0, where=problems[0].split(":")[0] if problems else None,
                       step=ctx.steps if steps is None else steps,
                       detail={"tensors": len(fa), "bit_exact": sorted(exact), "chained": sorted(chained),
                               "problems": problems})]


def block_operands(ctx: Context, n: int, k: int, name: str):
    """Seeded float32 operands of a block-scaled layer with an (n, k) weight: an input of 24
    rows (not a multiple of any block) with a zero row, a row near 1e4 and one near 1e-5, and an
    output gradient of gradient size (1e-3)."""
    rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])
    x = rng.standard_normal((24, k)).astype(np.float32)
    x[3] = 0.0
    x[5] *= np.float32(1e4)
    x[7] *= np.float32(1e-5)
    g = (rng.standard_normal((24, n)) * 1e-3).astype(np.float32)
    return x, g


def check_block_codes(ctx: Context) -> list[Record]:
    """Bit-exact: every code and scale of a block-scaled recipe's three GEMMs (row-wise FP8,
    MXFP8, NVFP4; docs/block-scaling.md), torch's layer functions against JAX's on the same
    operands: each block-scaled layer's canonical weight, seeded inputs and output gradients
    (`block_operands`), at the layer's initial seed and two precision steps (0 and 3: the
    stochastic-rounding streams move with the step).  The model checks bound the outputs these
    codes feed; this one holds what the arithmetic fixes to the bit (a scale rounding mode,
    the block axis, the tensor scale, the stochastic-rounding bits)."""
    def layer_seed(path):  # both backends' initial seed of a layer: CRC-32 of its path, 31 bits
        return zlib.crc32(path.encode()) & 0x7FFFFFFF

    problems, compared, layers = [], 0, 0
    for name, w in sorted(ctx.weights.items()):
        if not name.endswith(".weight") or np.ndim(w) != 2:
            continue
        layer = name[:-len(".weight")]
        recipe = ctx.policy.for_module(layer).fp8
        if not (recipe and recipe.block_scaled):
            continue
        layers += 1
        w = np.asarray(w, np.float32)
        x, g = block_operands(ctx, *w.shape, name)
        for step in (0, 3):
            try:
                pa = ctx.a.block_parts(x, w, g, recipe, layer_seed(layer), step)
                pb = ctx.b.block_parts(x, w, g, recipe, layer_seed(layer), step)
            except NotImplementedError:
                return [ctx.record("block-codes", "bit-exact", "skip",
                                   reason="a backend does not expose its block-scaled GEMM operands")]
            codes = {k for k in set(pa) | set(pb) if k not in ("y", "dx", "dw")}
            compared += len(codes)
            problems += [p.replace(": ", f" (step {step}): ", 1) for p in _byte_problems(
                ctx.a.name, ctx.b.name, {f"{layer}.{k}": pa[k] for k in codes if k in pa},
                {f"{layer}.{k}": pb[k] for k in codes if k in pb}, "block")]
    if not layers:
        return [ctx.record("block-codes", "bit-exact", "fail", reason="no block-scaled layer under this policy")]
    status, reason = ("fail" if problems else "pass"), "; ".join(problems[:4])
    return [ctx.record("block-codes", "bit-exact", status, reason=reason, tolerance=0.0,
                       where=problems[0].split(" (step")[0] if problems else None,
                       detail={"layers": layers, "tensors": compared, "problems": problems})]


# ---------------------------------------------------------------- orchestration
CHECK_NAMES = ("cast-input", "cast-output", "param-dtypes", "param-values", "dtype-flow", "forward", "layers",
               "gradients", "loss", "train-loss", "train-params", "update", "loss-scale", "optimizer-dtypes")
TIER_OF = {"cast-input": "bit-exact", "cast-output": "bit-exact", "param-dtypes": "bit-exact",
           "param-values": "bit-exact", "dtype-flow": "bit-exact", "loss-scale": "bit-exact",
           "optimizer-dtypes": "bit-exact", "forward": "tolerance", "layers": "tolerance",
           "gradients": "tolerance", "loss": "tolerance", "train-loss": "tolerance", "train-params": "tolerance",
           "update": "tolerance",
           "quant-codes": "bit-exact", "fp8-scales": "bit-exact", "block-codes": "bit-exact"}


def _guard(ctx: Context, names: tuple[str, ...], fn: Callable, *args) -> list[Record]:
    """Run a check; an exception is an ``error`` record of those checks (with the exception),
    not a crash and not a ``fail`` (which means the numbers diverged)."""
    t0 = time.perf_counter()
    try:
        recs = fn(*args)
    except Exception as e:  # noqa: BLE001 - every backend error becomes a visible error record
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        msg = msg if len(msg) <= 300 else msg[:300].rsplit(" ", 1)[0] + " ..."  # not mid-word
        recs = [ctx.record(n, TIER_OF[n], "error", reason=f"raised {msg}") for n in names]
    dt = (time.perf_counter() - t0) / max(len(recs), 1)
    for r in recs:
        r.seconds = dt
    return recs


def _optional(fn, *args, default=None):
    try:
        return fn(*args)
    except NotImplementedError:
        return default


def session_checks(ctx: Context, sa: Session, sb: Session, with_grads: bool = True) -> list[Record]:
    """Parameters, dtype flow, forward, layer-isolated and gradient checks on one session
    pair; forward and loss_and_grads leave parameters and optimizer state as they were."""
    out = check_params(ctx, sa, sb)
    x, y = ctx.batch(0)
    fwd = (sa.forward(x), sb.forward(x))
    out += _guard(ctx, ("forward",), check_forward, ctx, sa, sb, fwd)
    out += _guard(ctx, ("layers",), check_layers, ctx, sa, sb, fwd)
    grads = ({}, {})
    if with_grads:
        lg = (sa.loss_and_grads(x, y), sb.loss_and_grads(x, y))
        out += _guard(ctx, ("gradients", "loss"), check_grads, ctx, sa, sb, lg, fwd)
        grads = (_optional(sa.grad_dtypes, default={}), _optional(sb.grad_dtypes, default={}))
    out += _guard(ctx, ("dtype-flow",), check_dtype_flow, ctx, sa, sb, fwd, grads)
    return out


def run_checks(ctx: Context) -> list[Record]:
    """All checks of one (policy, model), skip records for what cannot run here."""
    reasons = [f"{be.name}: {r}" for be in (ctx.a, ctx.b) if (r := be.unsupported(ctx.policy))]
    extra = extra_checks(ctx.policy)
    if reasons:
        return [ctx.record(n, TIER_OF[n], "skip", reason="; ".join(reasons)) for n in CHECK_NAMES + extra]
    recs = _guard(ctx, ("cast-input", "cast-output"), check_casts, ctx)

    # One SGD session pair serves the parameter, forward, gradient and training checks.
    # Should any of them raise, training gets a fresh pair instead.
    shared: list = []
    before: list = []  # the quantized state of the shared pair before training

    def shared_checks():
        sa, sb = ctx.sessions(Optim("sgd", ctx.lr))
        out = session_checks(ctx, sa, sb)
        if not any(r.status == "error" for r in out):
            shared.extend((sa, sb))
            if "quant-codes" in extra:
                before.append((_optional(sa.quant_state, default={}), _optional(sb.quant_state, default={})))
        return out

    recs += _guard(ctx, ("param-dtypes", "param-values", "dtype-flow", "forward", "layers", "gradients", "loss"),
                   shared_checks)
    trained = bool(shared)
    recs += _guard(ctx, ("train-loss", "train-params", "update"), check_training, ctx, *shared)
    recs += _guard(ctx, ("loss-scale", "optimizer-dtypes"), check_loss_scale, ctx)
    if extra:
        pair = tuple(shared) if trained else None
        if "quant-codes" in extra:
            recs += _guard(ctx, ("quant-codes",), lambda: check_quant(
                ctx, *(pair or ctx.sessions(Optim("sgd", ctx.lr))), before[0] if pair and before else None))
        if "fp8-scales" in extra:
            # bit-exact after one step from the same weights: after that the trained weights
            # (and so their amaxes) differ by the GEMMs' summation order
            recs += _guard(ctx, ("fp8-scales",), lambda: check_fp8(ctx, *_trained_pair(ctx, 1), steps=1))
        if "block-codes" in extra:
            recs += _guard(ctx, ("block-codes",), check_block_codes, ctx)
    return _known_divergence(ctx, recs)


#: Semantic divergences of the backends that the suite has found and reports instead of
#: hiding under a tolerance: quantization mode -> why.  A tolerance record of such a policy
#: that fails becomes a skip naming the divergence (its numbers stay in the detail); the
#: bit-exact records are judged as usual.
KNOWN_DIVERGENCES = {
    "int8-training": ("known divergence: bitsandbytes has no CPU LLM.int8 path for int8-training (torch "
                      "multiplies the dequantized float16 weight), JAX runs LLM.int8 with int8 activations"),
}


def _known_divergence(ctx: Context, recs: list[Record]) -> list[Record]:
    modes = {p.quantization.mode for p in (ctx.policy, *(s for _, s in ctx.policy.overrides)) if p.quantization}
    why = next((KNOWN_DIVERGENCES[m] for m in sorted(modes) if m in KNOWN_DIVERGENCES), None)
    if why is None and ctx.spec.name == "opbyop" and not ctx.policy.is_mixed and \
            ctx.policy.compute_dtype in ("bfloat16", "float16"):
        why = ("known divergence: under a policy without autocast (-true, Keras' half, the 4-bit presets) "
               "opbyop's hand-written softmax rounds after each op in JAX, where torch's kernel computes in "
               "float32 and rounds once")
    if why is None:
        return recs
    for r in recs:
        if r.tier == "tolerance" and r.status == "fail":
            r.detail["divergence_reason"] = r.reason
            r.status, r.reason = "skip", f"{why}; measured: {r.reason}"
    return recs


def _trained_pair(ctx: Context, steps: int | None = None) -> tuple[Session, Session]:
    """A fresh SGD session pair after ``steps`` (default ``ctx.steps``) training steps."""
    sa, sb = ctx.sessions(Optim("sgd", ctx.lr))
    for t in range(ctx.steps if steps is None else steps):
        x, y = ctx.batch(t)
        sa.train_step(x, y)
        sb.train_step(x, y)
    return sa, sb


def extra_checks(policy: Policy) -> tuple[str, ...]:
    out = ()
    if any(p.quantization for p in (policy, *(s for _, s in policy.overrides))):
        out += ("quant-codes",)
    if any(p.fp8 for p in (policy, *(s for _, s in policy.overrides))):
        out += ("fp8-scales",)
    if any(p.fp8 and p.fp8.block_scaled for p in (policy, *(s for _, s in policy.overrides))):
        out += ("block-codes",)
    return out
