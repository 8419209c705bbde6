"""`autocast(fun, policy)`: any JAX function run under torch's CUDA autocast op table.

JAX has no autocast, so this module provides one as a function transformation: ``fun`` is
traced to a jaxpr at the dtypes of its inputs and the jaxpr is evaluated again, equation by
equation, with the table's rule for each op:

- matmul-likes (``dot_general``, ``conv_general_dilated``): operands cast to the compute
  dtype, float32 accumulation, one rounding to the compute dtype (an explicit wider
  ``preferred_element_type`` is kept: that is how a Flax Dense adds its bias before rounding);
  backward GEMMs take the compute-dtype cotangent and accumulate in float32;
- float32-list ops (exp, log, pow, rsqrt, sum, cumsum, softmax, logsumexp, norms...): half
  inputs are upcast and the result is float32;
- promote ops and everything downstream of a changed dtype: the widest input (type promotion);
- unlisted activations on half inputs (gelu, silu, sigmoid, tanh, softplus, elu, ...): computed
  in float32 with torch's formula and rounded once, as torch's kernels do (opmath);
- everything else runs in its input dtype.

The evaluator recurses into sub-jaxprs (jit, custom_jvp/custom_vjp, scan, while, cond, remat,
shard_map) and calls JAX's public API to rebuild them, so the result composes with jit, grad,
vmap and the control-flow primitives.  What it cannot see into (pure_callback, custom
primitives) keeps its dtypes, with a warning naming it; pallas_call kernels are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from dualprec import Policy, optable
from dualprec.dtypes import HALF_DTYPES

from .casts import accumulation_dtype, jax_dtype
from .ops import AS_WRITTEN, _freeze, _rounding_dot

__all__ = ["autocast", "AutocastWarning"]

_HALF = tuple(jnp.dtype(name) for name in HALF_DTYPES)  # from dualprec.dtypes


# The table by JAX name, from dualprec.optable.  Primitives stand for one op each
# (``exp``, ``reduce_sum``, ``integer_pow``).  Composites are JAX functions that trace to
# several primitives: the evaluator knows them by the name of the jit JAX puts around them
# (``log_softmax``, ``silu``, ``norm``) or by the Python frame in each equation's traceback
# (`_COMPOSITES`: softmax, gelu, logsumexp... which JAX inlines), never by replacing them.
_COMPOSITE_PREFIXES = ("jax.nn.", "jax.numpy.", "jax.scipy.special.", "jax.image.", "optax.")


def _jax_callables(lst: str) -> dict[str, str]:
    """Dotted JAX composites of the table's list ``lst`` -> the name they are known by (ops
    that are one primitive, jnp.exp or jnp.sum, are left to the primitive rules)."""
    return {name: name.rsplit(".", 1)[1] for e in optable.ENTRIES if e.list == lst and not e.jax_primitives
            for name in e.jax if name.startswith(_COMPOSITE_PREFIXES) and "[" not in name}


FP32_PRIMITIVES = frozenset(p for e in optable.FP32 for p in e.jax_primitives) | {"exp2", "cumlogsumexp"}
# Unlisted elementwise primitives computed in float32 and rounded once (torch's opmath).
OPMATH_PRIMITIVES = frozenset({"tanh", "logistic", "erf", "erfc"})
# Unlisted composites: activations (torch's formula in float32, one rounding) and the
# reductions jnp itself computes in float32 for half inputs (mean, var, std).
_ACTIVATIONS = ("gelu", "silu", "swish", "sigmoid", "elu", "leaky_relu", "mish", "hard_silu",
                "hard_swish", "hard_sigmoid", "celu", "selu", "log_sigmoid", "relu6", "hard_tanh", "glu")
_OPMATH_CALLABLES = {**{f"jax.nn.{n}": n for n in _ACTIVATIONS},
                     **{f"jax.numpy.{n}": n for n in ("mean", "var", "std")}}
# jnp.dot/jnp.vdot of two vectors (torch.dot, promote list) are recognised by shape
# (`_is_vector_dot`): JAX inlines them without their frame.
_COMPOSITE_MODULES = ("jax.nn", "jax.numpy", "jax.numpy.linalg", "jax.scipy.special", "jax.image", "optax")
_COMPOSITES = {**{k: (v, "fp32") for k, v in _jax_callables("fp32").items()},
           **{k: (v, "promote") for k, v in _jax_callables("promote").items()},
           **{k: (v, "opmath") for k, v in _OPMATH_CALLABLES.items()}}
FP32_COMPOSITES = frozenset(v for v, kind in _COMPOSITES.values() if kind == "fp32") | {"_softmax", "_log_softmax"}
_EXPLICIT_DTYPE = AS_WRITTEN  # ops.as_written regions: no rule inside
PROMOTE_COMPOSITES = frozenset(v for v, kind in _COMPOSITES.values() if kind == "promote") | {
    _EXPLICIT_DTYPE}
OPMATH_COMPOSITES = frozenset(v for v, kind in _COMPOSITES.values() if kind == "opmath") | {
    "_var", "_std", "_mean", "nanmean", "nanvar", "nanstd", "average"}


class AutocastWarning(UserWarning):
    """autocast met something it cannot see into; its dtypes were left as they were."""


class _Ctx:
    """The dtypes one autocast call applies.  ``policy``: the top-level policy of the call;
    a module under another policy (a per-module override, a nested autocast of another
    policy) is traced inside a `policy_scope` and evaluated with that policy's child
    context.  A policy that is not mixed has the table off: its ops run as traced (inputs
    whose dtypes changed are promoted)."""

    def __init__(self, policy: Policy, counter=None, children=None):
        self.policy = policy
        self.off = not policy.is_mixed
        self.compute = jax_dtype(policy.compute_dtype)
        self.accumulate = accumulation_dtype(policy.compute_dtype)
        self.upcast = 0  # > 0 inside a float32 composite evaluated from its half-precision trace
        self._counter = [0] if counter is None else counter
        self._children = {} if children is None else children

    @property
    def changes(self) -> int:
        """Equations not run as traced: whether a custom_jvp/vjp body is rewritten."""
        return self._counter[0]

    @changes.setter
    def changes(self, value: int) -> None:
        self._counter[0] = value

    def child(self, policy: Policy) -> "_Ctx":
        if policy == self.policy:
            return self
        key = (policy, self.upcast)
        if key not in self._children:
            self._children[key] = kid = _Ctx(policy, self._counter, self._children)
            kid.upcast = self.upcast
        return self._children[key]

    def probe(self) -> "_Ctx":
        """A copy with its own change counter (abstract evaluation of a body)."""
        twin = _Ctx(self.policy)
        twin.upcast = self.upcast
        return twin


# ----- policy scopes: which policy an equation was traced under -----------------------------
_SCOPE_PREFIX = "dualprec_policy#"
_SCOPE_IDS: dict = {}
_SCOPE_POLICIES: list = []
_SCOPE_LOCK = threading.Lock()
_SCOPE_RE = None


def policy_scope(policy: Policy):
    """Context manager: ops traced inside run under ``policy``'s table (not the enclosing
    autocast's).  A ``jax.named_scope``: it lives in the jaxpr (each equation's name stack),
    not in global state, so a trace cached by jit carries it with it."""
    with _SCOPE_LOCK:
        if policy not in _SCOPE_IDS:
            _SCOPE_IDS[policy] = len(_SCOPE_POLICIES)
            _SCOPE_POLICIES.append(policy)
        return jax.named_scope(f"{_SCOPE_PREFIX}{_SCOPE_IDS[policy]}")


_AS_TRACED = Policy.parse("32-true")  # a policy with the table off


def as_traced():
    """Context manager for library code already in the table's form (a quantized layer's
    float32 GEMM of half values, say): while an autocast trace runs, the ops traced inside
    run as traced, no rule applied.  Outside a trace: nothing."""
    if tracing_policy() is None:
        return contextlib.nullcontext()
    return policy_scope(_AS_TRACED)


def _scope_ctx(eqn, ctx):
    """The context of ``eqn``: its innermost policy scope's, or the enclosing one."""
    stack = str(eqn.source_info.name_stack)
    at = stack.rfind(_SCOPE_PREFIX)
    if at < 0:
        return ctx
    digits = stack[at + len(_SCOPE_PREFIX):].split("/", 1)[0]
    return ctx.child(_SCOPE_POLICIES[int(digits)])


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)  # PRNG keys: extended dtypes


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _is_half(dtype) -> bool:
    return _is_float(dtype) and jnp.dtype(dtype) in _HALF


def _cast(x, dtype):
    if not _is_float(_dtype(x)) or not _is_float(dtype) or _dtype(x) == dtype:
        return x
    return lax.convert_element_type(x, dtype)


# ----- the evaluator ------------------------------------------------------------------------
def _literal(v):
    val = v.val
    if isinstance(val, (int, float, bool, complex)) and hasattr(v.aval, "dtype"):
        return np.asarray(val, v.aval.dtype)
    return val


def _patterns(jaxpr):
    """Two jnp reductions at torch's granularity, found in a flat jaxpr:

    - sums: ids of the converts closing ``convert(half->f32) -> reduce_sum/prod -> convert(->half)``,
      ``jnp.sum``/``prod`` of a half input, which the table runs and returns in float32 (and
      ``convert(x) -> scatter -> convert(back to x's dtype)``: ``x.at[i].set(v)`` of a wider
      ``v``, kept at the promoted dtype as index_put / scatter_add are);
    - means: reduce_sum id -> id of the ``div`` that makes it ``jnp.mean`` (mean is on no list:
      a half input is summed in float32 and the mean rounded once, as jnp does for half inputs);
    - scatters: scatter id -> the float value its updates were converted from (``.at[].set``).
    """
    producer, uses = {}, {}
    for e in jaxpr.eqns:
        for v in e.invars:
            if isinstance(v, core.Var):
                uses.setdefault(v, []).append(e)
        for v in e.outvars:
            producer[v] = e
    for v in jaxpr.outvars:
        if isinstance(v, core.Var):
            uses.setdefault(v, []).append(None)
    sums, means, scatters, log10s = set(), {}, {}, set()

    def producer_of(v):  # a literal operand (``.at[0]``, a constant update) has no producer
        return producer.get(v) if isinstance(v, core.Var) else None

    for e in jaxpr.eqns:
        if e.primitive.name == "mul" and len(e.invars) == 2 and _is_log10_constant(e.invars[1]) and \
                producer_of(e.invars[0]) is not None and producer_of(e.invars[0]).primitive.name == "log":
            log10s.add(id(e))
            continue
        if e.primitive.name in _SCATTERS and len(e.invars) >= 3:
            # x.at[i].set(v) / .add(v): jnp casts v to x's dtype before the primitive; the
            # table promotes (index_put, scatter_add), so the value before that cast counts
            src = producer_of(e.invars[2])
            if src is not None and src.primitive.name == "convert_element_type" and \
                    isinstance(src.invars[0], core.Var) and hasattr(src.invars[0].aval, "dtype") and \
                    _is_float(src.invars[0].aval.dtype) and _is_float(e.invars[0].aval.dtype):
                scatters[id(e)] = src.invars[0]
            # ... or casts x up, scatters, and casts the result back down to x's dtype: the
            # promoted result is kept
            out_uses = uses.get(e.outvars[0], [])
            src = producer_of(e.invars[0])
            if len(out_uses) == 1 and out_uses[0] is not None and src is not None and \
                    out_uses[0].primitive.name == "convert_element_type" and \
                    src.primitive.name == "convert_element_type" and \
                    hasattr(src.invars[0].aval, "dtype") and _is_float(src.invars[0].aval.dtype) and \
                    out_uses[0].params["new_dtype"] == src.invars[0].aval.dtype and \
                    _traced_in(out_uses[0], _JNP_SCATTER):  # jnp's cast, not one the user wrote
                sums.add(id(out_uses[0]))
            continue
        if e.primitive.name not in ("reduce_sum", "reduce_prod"):
            continue
        out_uses = uses.get(e.outvars[0], [])
        if len(out_uses) != 1 or out_uses[0] is None:
            continue
        nxt, src = out_uses[0], producer_of(e.invars[0])
        if nxt.primitive.name == "div" and nxt.invars[0] is e.outvars[0] and not nxt.invars[1].aval.ndim:
            means[id(e)] = id(nxt)
        elif src is not None and src.primitive.name == "convert_element_type":
            half = src.invars[0].aval.dtype
            if _is_half(half) and nxt.primitive.name == "convert_element_type" and nxt.params["new_dtype"] == half:
                sums.add(id(nxt))
    return sums, means, scatters, log10s


_ONE_OVER_LN10 = 0.4342944819032518


def _is_log10_constant(v) -> bool:
    """``jnp.log10(x)`` is ``log(x) * 1/log(10)`` with the constant in x's dtype (an inlined
    jit: no frame of its own in the trace); of a half x the constant is rounded to half."""
    return isinstance(v, core.Literal) and getattr(v.aval, "ndim", None) == 0 and _is_half(v.aval.dtype) \
        and np.asarray(v.val, v.aval.dtype) == np.asarray(_ONE_OVER_LN10, v.aval.dtype)


_JNP_SCATTER = ("jax", "_src", "ops", "scatter.py")
_JNP_REDUCTIONS = ("jax", "_src", "numpy", "reductions.py")


def _reduce(eqn, invals, ctx):
    """``reduce_sum``/``reduce_prod`` (sum, prod: float32 list).  jnp traces a sum of a half
    input without ``dtype=`` as ``convert(->f32) -> reduce -> convert(->half)`` (`_patterns`);
    a reduction *in* a half dtype traced by jnp is an explicit ``dtype=`` (``jnp.sum(x,
    dtype=jnp.bfloat16)``), kept as torch keeps it.  A half ``lax.reduce_sum`` written by hand
    has no jnp frame and gets the float32 rule."""
    if not ctx.upcast and _is_half(eqn.invars[0].aval.dtype) and _traced_in(eqn, _JNP_REDUCTIONS):
        return _bind_original(eqn, invals, ctx)
    if not ctx.upcast:
        return _fp32(eqn, invals, ctx)
    return _bind_flexible(ctx, eqn, invals)


def _explicit_half_dtype(closed) -> bool:
    """A ``jnp.cumsum``/``cumprod`` body that casts a float input to a half dtype before the
    cumulative op: an explicit ``dtype=`` (kept).  ``jnp.cumsum(x, dtype=x.dtype)`` of a half
    ``x`` traces exactly as ``jnp.cumsum(x)`` and gets the float32 rule."""
    return any(e.primitive.name == "convert_element_type" and _is_half(e.params["new_dtype"])
               and hasattr(e.invars[0].aval, "dtype") and _is_float(e.invars[0].aval.dtype)
               and jnp.dtype(e.invars[0].aval.dtype) != jnp.dtype(e.params["new_dtype"])
               for e in closed.jaxpr.eqns)


def _traced_in(eqn, path_tail) -> bool:
    """Whether a frame of the file ending in ``path_tail`` traced ``eqn``."""
    import os

    tb = eqn.source_info.traceback
    if tb is None:
        return False
    tail = os.path.join(*path_tail)
    return any(code.co_filename.endswith(tail) for code in tb.raw_frames()[0])


def _eval(jaxpr, consts, args, ctx):
    """Evaluate an open jaxpr under the table; values may have other dtypes than its avals."""
    env = {}

    def read(v):
        return _literal(v) if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    sums, means, scatters, log10s = _patterns(jaxpr)
    runs = _composite_runs(jaxpr)
    round_after = {}
    up, round_to = {}, None  # the composite run being evaluated: its inputs upcast, its rounding
    done_until = -1  # an activation run computed whole by torch's formula (`_torch_formula_run`)
    for i, eqn in enumerate(jaxpr.eqns):
        if i <= done_until:
            continue
        ectx = _scope_ctx(eqn, ctx)
        run = runs.get(i) if not (ectx.upcast or ectx.off) else None
        if run is not None and i == run.start and run.kind == "opmath":
            out = _torch_formula_run(jaxpr, run, [read(v) for v in run.inputs], ectx)
            if out is not None:
                env[run.escaping[0]] = out
                done_until = run.end
                continue
        if run is not None:
            # a composite of the table, evaluated as traced in float32 (fp32, opmath) or with
            # no rule inside (promote)
            if i == run.start:
                up, round_to = _start_run(run, [read(v) for v in run.inputs], ectx)
            invals = [up[v] if isinstance(v, core.Var) and v in up else read(v) for v in eqn.invars]
            ectx.upcast += 1
            try:
                outs = _eval_eqn(eqn, invals, ectx)
            finally:
                ectx.upcast -= 1
        else:
            invals = [read(v) for v in eqn.invars]
            if id(eqn) in scatters and not (ectx.upcast or ectx.off):
                invals[2] = read(scatters[id(eqn)])
            if ectx.upcast or ectx.off:
                outs = _eval_eqn(eqn, invals, ectx)
            elif id(eqn) in log10s and _is_float(_dtype(invals[0])) and not _is_half(_dtype(invals[0])):
                ectx.changes += 1  # jnp.log10 of an upcast input: its constant in that dtype
                outs = lax.mul(invals[0], np.asarray(_ONE_OVER_LN10, _dtype(invals[0])))
            elif id(eqn) in sums and _dtype(invals[0]) == jnp.promote_types(_dtype(invals[0]), ectx.accumulate):
                ectx.changes += 1
                outs = invals[0]  # the float32 sum (scatter) stays float32
            elif id(eqn) in means and _is_half(_dtype(invals[0])):
                ectx.changes += 1
                round_after[means[id(eqn)]] = _dtype(invals[0])
                outs = _bind_flexible(ectx, eqn, [_cast(invals[0], ectx.accumulate)])
            else:
                outs = _eval_eqn(eqn, invals, ectx)
        if id(eqn) in round_after:
            outs = _cast(outs, round_after.pop(id(eqn)))
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
        if run is not None and i == run.end:
            if round_to is not None:
                for v in run.escaping:
                    if _is_float(_dtype(env[v])):
                        env[v] = _cast(env[v], round_to)
            up, round_to = {}, None
    return [read(v) for v in jaxpr.outvars]


# ----- composites found by the Python function that traced them -----------------------------
class _Run:
    """Consecutive equations traced by one call of a table composite (``kind``: fp32,
    promote, opmath), its inputs and the values it passes on."""

    __slots__ = ("end", "escaping", "inputs", "kind", "name", "start")

    def __init__(self, kind, start, end, inputs, escaping, name=""):
        self.kind, self.start, self.end, self.inputs, self.escaping = kind, start, end, inputs, escaping
        self.name = name


_CODES: dict = {}  # code object of a table composite -> its kind; rebuilt as modules load
_CODES_FOR: list = [None]


def _composite_codes() -> dict:
    """The code objects of the table's composites importable now (their Python functions,
    unwrapped from JAX's jit), whatever name a user imported them under."""
    loaded = tuple(m in sys.modules for m in _COMPOSITE_MODULES)
    if _CODES_FOR[0] != loaded:
        codes = {}
        for dotted, (name, kind) in _COMPOSITES.items():
            mod_name, attr = dotted.rsplit(".", 1)
            fn = getattr(sys.modules.get(mod_name), attr, None)
            fn = getattr(fn, "__wrapped__", fn)
            while hasattr(fn, "__wrapped__"):
                fn = fn.__wrapped__
            code = getattr(fn, "__code__", None)
            if code is not None:
                codes[code] = (kind, name)
        _CODES.clear()
        _CODES.update(codes)
        _CODES_FOR[0] = loaded
    return _CODES


def _composite_of(eqn, codes):
    """(call key, kind) of the outermost table composite whose Python frame traced ``eqn``."""
    tb = eqn.source_info.traceback
    if tb is None:
        return None
    frames, lastis = tb.raw_frames()
    for i in range(len(frames) - 1, -1, -1):  # outermost first
        found = codes.get(frames[i])
        if found is not None:
            return (tuple(zip(frames[i + 1:], lastis[i + 1:])), frames[i]), found
    return None


def _composite_runs(jaxpr) -> dict:
    """Equation index -> its `_Run`, for the equations a table composite traced.  This finds
    composites however they were imported (``from jax.nn import gelu``, optax's losses) and
    in bodies traced before: the traceback each equation carries names the function."""
    codes = _composite_codes()
    if not codes or not jaxpr.eqns:
        return {}
    marks = [_composite_of(e, codes) for e in jaxpr.eqns]
    if not any(marks):
        return {}
    last_use = {}
    for k, e in enumerate(jaxpr.eqns):
        for v in e.invars:
            if isinstance(v, core.Var):
                last_use[v] = k
    for v in jaxpr.outvars:
        if isinstance(v, core.Var):
            last_use[v] = len(jaxpr.eqns)
    runs, n, i = {}, len(jaxpr.eqns), 0
    while i < n:
        if marks[i] is None:
            i += 1
            continue
        j = i
        while j + 1 < n and marks[j + 1] is not None and marks[j + 1][0] == marks[i][0]:
            j += 1
        eqns = jaxpr.eqns[i:j + 1]
        produced = {v for e in eqns for v in e.outvars}
        inputs = list(dict.fromkeys(v for e in eqns for v in e.invars
                                    if isinstance(v, core.Var) and v not in produced))
        escaping = [v for e in eqns for v in e.outvars if last_use.get(v, -1) > j]
        run = _Run(marks[i][1][0], i, j, inputs, escaping, marks[i][1][1])
        for k in range(i, j + 1):
            runs[k] = run
        i = j + 1
    return runs


def _has_primitive(eqns, name) -> bool:
    for e in eqns:
        if e.primitive.name == name:
            return True
        for p in e.params.values():
            sub = p.jaxpr if isinstance(p, core.ClosedJaxpr) else p
            if isinstance(sub, core.Jaxpr) and _has_primitive(sub.eqns, name):
                return True
    return False


def _torch_formula_run(jaxpr, run, values, ctx):
    """An activation JAX traced (``gelu(x)`` however imported) with one half input and one
    output: torch's formula in float32, rounded once, as a call of the activation computes it.  None
    (evaluate the run's own equations in float32) for anything else."""
    if len(values) != 1 or len(run.escaping) != 1:
        return None
    return _torch_formula(run.name, jaxpr.eqns[run.start:run.end + 1], values[0], run.escaping[0].aval, ctx)


def _torch_formula(name, eqns, x, out_aval, ctx):
    from .ops import _TORCH_ACTIVATIONS

    formula = _TORCH_ACTIVATIONS.get(name)
    if formula is None or name in ("elu", "leaky_relu"):
        return None  # elu/leaky_relu: their parameters are not in the trace (JAX's formula is torch's)
    if not _is_half(_dtype(x)) or tuple(out_aval.shape) != tuple(x.shape):
        return None
    kwargs = {}
    if name == "gelu":  # the exact form calls erf or erfc, the tanh form tanh
        kwargs["approximate"] = not (_has_primitive(eqns, "erf") or _has_primitive(eqns, "erfc"))
    ctx.changes += 1
    return _cast(formula(_cast(x, ctx.accumulate), **kwargs), _dtype(x))


def _start_run(run, values, ctx):
    """({input var: value it enters the run with}, dtype its outputs are rounded to)."""
    halves = [_dtype(x) for x in values if _is_half(_dtype(x))]
    if run.kind == "promote" or not halves:
        return {}, None
    ctx.changes += 1
    up = {v: _cast(x, ctx.accumulate) if _is_half(_dtype(x)) else x for v, x in zip(run.inputs, values)}
    return up, (halves[0] if run.kind == "opmath" else None)


def _eval_closed(closed, args, ctx):
    return _eval(closed.jaxpr, closed.consts, args, ctx)


def _bind(eqn, invals, **override):
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params({**eqn.params, **override}))


def _bind_original(eqn, invals, ctx):
    """The equation as traced: inputs back in their traced dtypes (opaque ops, fallbacks)."""
    ctx.changes += _changed(eqn, invals)
    return _bind(eqn, [_cast(x, v.aval.dtype) for x, v in zip(invals, eqn.invars)])


def _changed(eqn, invals) -> bool:
    return any(_dtype(x) != v.aval.dtype for x, v in zip(invals, eqn.invars)
               if hasattr(v.aval, "dtype"))


def _promoted(eqn, invals):
    """Inputs of an op whose float operands were traced with one dtype, cast to the widest of
    their dtypes now (0-d operands and Python scalars follow the others)."""
    floats = [i for i, v in enumerate(eqn.invars) if hasattr(v.aval, "dtype") and _is_float(v.aval.dtype)]
    if len({jnp.dtype(eqn.invars[i].aval.dtype) for i in floats}) != 1:
        return invals
    # torch's rule: dimensioned tensors win over 0-d tensors and Python scalars
    strong = [i for i in floats if eqn.invars[i].aval.ndim and not eqn.invars[i].aval.weak_type] or floats
    target = functools.reduce(jnp.promote_types, (_dtype(invals[i]) for i in strong))
    # a Python number JAX rounded to the half dtype it was traced with, now meeting a wider
    # operand: the number as written (torch keeps a Python scalar in double)
    return [_scalar_up(v, target) if i in floats and _is_python_scalar(v) and not _is_half(target)
            else _cast(x, target) if i in floats else x for i, (v, x) in enumerate(zip(eqn.invars, invals))]


def _bind_flexible(ctx, eqn, invals):
    if not _changed(eqn, invals):
        return _bind(eqn, invals)
    ctx.changes += 1
    promoted = _promoted(eqn, invals)
    try:
        return _bind(eqn, promoted, **_widened_accumulation(eqn, promoted))
    except (TypeError, ValueError):
        return _bind_original(eqn, invals, ctx)


def _widened_accumulation(eqn, invals) -> dict:
    """A dot/conv traced with ``preferred_element_type`` its operands' half dtype whose
    operands are now wider (inside a float32 composite: ``jax.image.resize``'s weight
    GEMMs): the wider dtype, or the binding would round the result back to half."""
    pet = eqn.params.get("preferred_element_type")
    if pet is None or not _is_half(pet) or len(invals) < 2:
        return {}
    traced = jnp.promote_types(eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype)
    now = jnp.promote_types(_dtype(invals[0]), _dtype(invals[1]))
    if jnp.dtype(pet) != traced or not _is_float(now) or _is_half(now):
        return {}
    return {"preferred_element_type": now}


def _eval_eqn(eqn, invals, ctx):
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if ctx.off and name not in _STRUCTURAL:
        rule = None if name in _CALLBACKS or not _is_jax_primitive(eqn.primitive) else _off
    if rule is not None:
        return rule(eqn, invals, ctx)
    if name in FP32_PRIMITIVES and not ctx.upcast:
        return _fp32(eqn, invals, ctx)
    if name in OPMATH_PRIMITIVES:
        return _opmath_primitive(eqn, invals, ctx)
    if name in _OPAQUE_SILENT:
        return _bind_original(eqn, invals, ctx)
    if name in _CALLBACKS or not _is_jax_primitive(eqn.primitive):
        _warn_opaque(name)
        return _bind_original(eqn, invals, ctx)
    if _has_subjaxpr(eqn):
        # scatter/reduce/reduce_window carry a combiner traced for their dtypes: run as traced
        return _bind_original(eqn, invals, ctx)
    return _bind_flexible(ctx, eqn, invals)


# ----- rules ----------------------------------------------------------------------------
def _off(eqn, invals, ctx):
    """The table off (a policy that is not mixed): as traced, changed inputs promoted."""
    if _has_subjaxpr(eqn):
        return _bind_original(eqn, invals, ctx)
    return _bind_flexible(ctx, eqn, invals)


def _fp32(eqn, invals, ctx):
    """A float32-list op: half inputs upcast, float32 out."""
    if not any(_is_half(_dtype(x)) for x in invals):
        return _bind_flexible(ctx, eqn, invals)
    ctx.changes += 1
    up = [_scalar_up(v, ctx.accumulate) if _is_python_scalar(v) else
          _cast(x, ctx.accumulate) if _is_half(_dtype(x)) else x for v, x in zip(eqn.invars, invals)]
    return _bind_flexible(ctx, eqn, up)


def _is_python_scalar(v) -> bool:
    """A 0-d half constant in the trace: a Python number JAX rounded to a half dtype while
    tracing (``x ** 1.7`` of a float16 ``x`` traces to ``pow x 1.7001953:f16[]``; the jaxpr
    no longer tells it from ``jnp.float16(1.7)``, which is rare in an fp32-list op)."""
    return isinstance(v, core.Literal) and getattr(v.aval, "ndim", None) == 0 and _is_half(v.aval.dtype)


def _scalar_up(v, dtype):
    """The number as written, in ``dtype``: the shortest decimal that rounds to the traced
    half value (``1.7``, not ``1.7001953``).  torch's ``pow(x, 1.7)`` under CUDA autocast takes
    the exponent as a double; the half literal JAX keeps is all that is left of it."""
    half = np.asarray(v.val, v.aval.dtype)
    value = float(half)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if np.asarray(short, half.dtype) == half:
            return np.asarray(short, dtype)
    return np.asarray(value, dtype)


def _opmath_primitive(eqn, invals, ctx):
    """An unlisted elementwise op on a half input: float32 inside, one rounding (torch's opmath)."""
    dtypes = {_dtype(x) for x in invals if _is_float(_dtype(x))}
    if len(dtypes) != 1 or not _is_half(next(iter(dtypes))):
        return _bind_flexible(ctx, eqn, invals)
    half = next(iter(dtypes))
    ctx.changes += 1
    if eqn.primitive.name == "logistic":  # torch's sigmoid formula (jax.nn.sigmoid is logistic)
        from .ops import _TORCH_ACTIVATIONS

        return _cast(_TORCH_ACTIVATIONS["sigmoid"](_cast(invals[0], ctx.accumulate)), half)
    out = _bind_flexible(ctx, eqn, [_cast(x, ctx.accumulate) for x in invals])
    return [_cast(o, half) for o in out] if eqn.primitive.multiple_results else _cast(out, half)


_ELIGIBLE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _eligible(dtype) -> bool:
    # torch autocast casts float16/bfloat16/float32 operands; float64 ones are left alone, and
    # so are float8 operands (an FP8 layer's scaled GEMM is not on the lower list).
    return jnp.dtype(dtype) in _ELIGIBLE


def _matmul_out_dtype(eqn, ctx):
    """The compute dtype, unless the trace asked for a wider accumulation explicitly."""
    traced = jnp.promote_types(*(v.aval.dtype for v in eqn.invars[:2]))
    pet = eqn.params.get("preferred_element_type")
    if pet is not None and jnp.dtype(pet) != traced and _is_float(pet) \
            and jnp.finfo(pet).bits > jnp.finfo(ctx.compute).bits:
        return jnp.dtype(pet), True
    return ctx.compute, False


def _is_vector_dot(eqn) -> bool:
    """A dot of two vectors (``jnp.dot``/``jnp.vdot`` of 1-D arrays: torch.dot, promote list).
    JAX inlines those functions without their Python frame, so the shape is what is left."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return (eqn.invars[0].aval.ndim == 1 and eqn.invars[1].aval.ndim == 1 and tuple(lc) == (0,)
            and tuple(rc) == (0,) and not lb and not rb)


def _dot_general(eqn, invals, ctx):
    lhs, rhs = invals[:2]
    if ctx.upcast or not (_eligible(_dtype(lhs)) and _eligible(_dtype(rhs))) or _is_vector_dot(eqn):
        return _bind_flexible(ctx, eqn, invals)
    out, explicit = _matmul_out_dtype(eqn, ctx)
    lhs, rhs = _cast(lhs, ctx.compute), _cast(rhs, ctx.compute)
    p = eqn.params
    if explicit and not _changed(eqn, [lhs, rhs]):
        return _bind(eqn, [lhs, rhs])  # a dot already in the table's form (Flax layers, ours)
    ctx.changes += 1
    precision = p.get("precision")
    if p.get("out_sharding") is not None or explicit or not _is_half(ctx.compute):
        kw = {"out_sharding": p["out_sharding"]} if p.get("out_sharding") is not None else {}
        y = lax.dot_general(lhs, rhs, p["dimension_numbers"], precision=precision,
                            preferred_element_type=ctx.accumulate, **kw)
    else:
        # Custom VJP: backward GEMMs on the compute-dtype cotangent, float32 accumulation
        # (autodiff of the forward alone would run them in float32).
        y = _rounding_dot(_freeze(p["dimension_numbers"]), precision, jnp.dtype(ctx.accumulate))(lhs, rhs)
    return _cast(y, out)


def _conv(eqn, invals, ctx):
    lhs, rhs = invals[:2]
    if ctx.upcast or not (_eligible(_dtype(lhs)) and _eligible(_dtype(rhs))):
        return _bind_flexible(ctx, eqn, invals)
    out, explicit = _matmul_out_dtype(eqn, ctx)
    lhs, rhs = _cast(lhs, ctx.compute), _cast(rhs, ctx.compute)
    if explicit and not _changed(eqn, [lhs, rhs]):
        return _bind(eqn, [lhs, rhs])
    ctx.changes += 1
    params = dict(eqn.params, preferred_element_type=ctx.accumulate)
    return _cast(eqn.primitive.bind(lhs, rhs, **params), out)


def _convert(eqn, invals, ctx):
    (x,) = invals
    if ctx.upcast and _is_half(eqn.params["new_dtype"]) and _is_float(_dtype(x)):
        ctx.changes += 1
        return x  # a rounding JAX's half-precision trace put inside a float32 composite
    return _bind(eqn, [x])


def _jit(eqn, invals, ctx):
    name = eqn.params.get("name", "")
    closed = eqn.params["jaxpr"]
    if name == _PINNED:  # `pin_dtype`: the dtype the trace had, whatever the table made of it
        return [_cast(x, v.aval.dtype) for x, v in zip(invals, closed.jaxpr.outvars)]
    if not ctx.upcast and name in OPMATH_COMPOSITES and len(invals) == 1 and len(closed.jaxpr.outvars) == 1:
        out = _torch_formula(name, closed.jaxpr.eqns, invals[0], closed.jaxpr.outvars[0].aval, ctx)
        if out is not None:  # an activation JAX jits under its name (silu, mish, hard_silu)
            return [out]
    if ctx.off:
        return _eval_closed(closed, invals, ctx)
    if name in _CUMULATIVE and not ctx.upcast and _explicit_half_dtype(closed):
        # jnp.cumsum(x, dtype=jnp.bfloat16) of a wider x: as written (an explicit dtype is kept)
        return _eval_closed(closed, [_cast(x, v.aval.dtype) for x, v in zip(invals, closed.jaxpr.invars)],
                            ctx.child(_AS_TRACED))
    if name in PROMOTE_COMPOSITES and not ctx.upcast:
        return _promote_region(closed, invals, ctx)
    if not ctx.upcast and any(_is_half(_dtype(x)) for x in invals):
        if name in FP32_COMPOSITES:
            return _upcast_region(closed, invals, ctx, None)
        if name in OPMATH_COMPOSITES:
            half = next(_dtype(x) for x in invals if _is_half(_dtype(x)))
            return _upcast_region(closed, invals, ctx, half)
    if not ctx.upcast and name in (FP32_COMPOSITES | OPMATH_COMPOSITES) and _widened(closed, invals):
        # traced for half inputs that an earlier rule widened (x ** 2 is float32 under the
        # table): the composite runs in its actual input dtype, without the rounding back to
        # half its trace ends with (torch: x.pow(2).mean() is float32)
        return _upcast_region(closed, invals, ctx, None)
    return _eval_closed(closed, invals, ctx)


def _widened(closed, invals) -> bool:
    """Some input was traced half and arrives wider (float32)."""
    return any(_is_half(v.aval.dtype) and _is_float(_dtype(x)) and not _is_half(_dtype(x))
               for v, x in zip(closed.jaxpr.invars, invals) if hasattr(v.aval, "dtype"))


def _upcast_region(closed, invals, ctx, round_to):
    """A composite JAX traced in half precision, evaluated as if traced in float32."""
    up = [_cast(x, ctx.accumulate) if _is_half(_dtype(x)) else x for x in invals]
    ctx.changes += 1
    ctx.upcast += 1
    try:
        outs = _eval_closed(closed, up, ctx)
    finally:
        ctx.upcast -= 1
    return outs if round_to is None else [_cast(o, round_to) for o in outs]


def _promote_region(closed, invals, ctx):
    """A promote-list composite: float inputs at the widest of their dtypes, no other rule."""
    floats = [_dtype(x) for x in invals if _is_float(_dtype(x))]
    widest = functools.reduce(jnp.promote_types, floats) if floats else None
    ctx.changes += len(set(floats)) > 1
    ctx.upcast += 1  # no matmul rule inside: tensordot of float32 operands stays float32
    try:
        return _eval_closed(closed, [_cast(x, widest) if widest is not None else x for x in invals], ctx)
    finally:
        ctx.upcast -= 1


def _rewrites(closed, invals, ctx) -> bool:
    """Whether the table changes anything in ``closed`` for these inputs (traced abstractly)."""
    probe = ctx.probe()
    jax.eval_shape(lambda *a: _eval_closed(closed, a, probe), *invals)
    return probe.changes > 0


def _custom_jvp(eqn, invals, ctx):
    closed = eqn.params["call_jaxpr"]
    if not _changed(eqn, invals) and not _rewrites(closed, invals, ctx):
        return _bind(eqn, invals)  # nothing to do inside: keep the call, rule and all
    ctx.changes += 1
    n_consts = eqn.params["num_consts"]

    def primal(*args):
        return _eval_closed(closed, args, ctx)

    out_avals = jax.eval_shape(primal, *invals)
    fun = jax.custom_jvp(primal)

    def jvp(primals, tangents):
        n = len(primals) - n_consts
        with _tracing(ctx.policy):  # the rule sees what the primal saw when it was traced
            rule, rule_consts, out_zeros = eqn.params["jvp_jaxpr_fun"].call_wrapped(*([False] * n))
        outs = _eval(rule, rule_consts, [*primals[n_consts:], *tangents[n_consts:]], ctx)
        p_out, t_out = outs[:len(out_zeros)], iter(outs[len(out_zeros):])
        p_out = [_cast(p, a.dtype) for p, a in zip(p_out, out_avals)]
        t_out = [jnp.zeros(p.shape, p.dtype) if z else _cast(next(t_out), p.dtype)
                 for p, z in zip(p_out, out_zeros)]
        return p_out, t_out

    fun.defjvp(jvp)
    return fun(*invals)


def _custom_vjp(eqn, invals, ctx):
    closed = eqn.params["call_jaxpr"]
    if not _changed(eqn, invals) and not _rewrites(closed, invals, ctx):
        return _bind(eqn, invals)
    ctx.changes += 1
    # The first num_consts inputs are values the function closed over (array constants): not
    # differentiated, as in JAX (which raises if they carry a tangent, here too).
    n_consts = eqn.params["num_consts"]
    consts = invals[:n_consts]

    def primal(*args):
        return _eval_closed(closed, [*consts, *args], ctx)

    fun = jax.custom_vjp(primal)

    def fwd(*args):
        return primal(*args), args

    def bwd(args, cts):
        # The user's backward rule, on the dtypes it was written for (torch runs a custom
        # autograd Function's backward outside autocast too); the forward is recomputed.
        traced = [_cast(a, v.aval.dtype) for a, v in zip([*consts, *args], eqn.invars)]
        _, vjp = jax.vjp(lambda *a: _bind(eqn, [*traced[:n_consts], *a]), *traced[n_consts:])
        grads = vjp([_cast(c, v.aval.dtype) for c, v in zip(cts, eqn.outvars)])
        return tuple(_cast(g, _dtype(a)) for g, a in zip(grads, args))

    fun.defvjp(fwd, bwd)
    return fun(*invals[n_consts:])


def _scan(eqn, invals, ctx):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
    carry_dtypes = [v.aval.dtype for v in eqn.invars[nc:nc + ncarry]]
    body = p["jaxpr"]

    def step(carry, x):
        outs = _eval_closed(body, [*consts, *carry, *x], ctx)
        return [_cast(c, d) for c, d in zip(outs[:ncarry], carry_dtypes)], outs[ncarry:]

    carry, ys = lax.scan(step, [_cast(c, d) for c, d in zip(init, carry_dtypes)], xs,
                         length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


def _while(eqn, invals, ctx):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    carry_dtypes = [v.aval.dtype for v in eqn.invars[cn + bn:]]

    def cond(carry):
        return _eval_closed(p["cond_jaxpr"], [*cconsts, *carry], ctx)[0]

    def body(carry):
        outs = _eval_closed(p["body_jaxpr"], [*bconsts, *carry], ctx)
        return [_cast(c, d) for c, d in zip(outs, carry_dtypes)]

    return lax.while_loop(cond, body, [_cast(c, d) for c, d in zip(init, carry_dtypes)])


def _cond(eqn, invals, ctx):
    index, *ops = invals
    out_dtypes = [v.aval.dtype for v in eqn.outvars]

    def branch(closed):
        return lambda *o: [_cast(x, d) for x, d in zip(_eval_closed(closed, o, ctx), out_dtypes)]

    return lax.switch(index, [branch(b) for b in eqn.params["branches"]], *ops)


def _remat(eqn, invals, ctx):
    p = eqn.params
    fun = jax.checkpoint(lambda *a: _eval(p["jaxpr"], (), a, ctx), prevent_cse=p["prevent_cse"],
                         policy=p["policy"])
    return fun(*invals)


def _shard_map(eqn, invals, ctx):
    p = eqn.params
    fun = jax.shard_map(lambda *a: tuple(_eval(p["jaxpr"], (), a, ctx)), mesh=p["mesh"],
                        in_specs=tuple(p["in_specs"]), out_specs=tuple(p["out_specs"]),
                        check_vma=p.get("check_vma", True), axis_names=set(p["newly_manual_axes"]))
    return list(fun(*invals))


_SCATTERS = ("scatter", "scatter-add")


def _scatter(eqn, invals, ctx):
    """index_put / scatter_add (promote list): operand and updates at the wider of their
    dtypes (torch: ``x.index_put((i,), v)`` of a float16 ``x`` and float32 ``v`` is float32)."""
    operand, indices, updates = invals[:3]
    if ctx.upcast or ctx.off or not (_is_float(_dtype(operand)) and _is_float(_dtype(updates))):
        return _bind_original(eqn, invals, ctx)
    target = jnp.promote_types(_dtype(operand), _dtype(updates))
    if target == eqn.invars[0].aval.dtype and _dtype(operand) == target and _dtype(updates) == target:
        return _bind(eqn, invals)
    ctx.changes += 1
    p = eqn.params
    fn = lax.scatter_add if eqn.primitive.name == "scatter-add" else lax.scatter
    return fn(_cast(operand, target), indices, _cast(updates, target), p["dimension_numbers"],
              indices_are_sorted=p["indices_are_sorted"], unique_indices=p["unique_indices"], mode=p["mode"])


def _closed_call(eqn, invals, ctx):
    return _eval_closed(eqn.params["call_jaxpr"], invals, ctx)


_CUMULATIVE = frozenset({"cumsum", "cumprod"})

_RULES = {
    "reduce_sum": _reduce, "reduce_prod": _reduce,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "convert_element_type": _convert,
    "jit": _jit, "pjit": _jit,
    "custom_jvp_call": _custom_jvp,
    "custom_vjp_call": _custom_vjp,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "remat2": _remat, "checkpoint": _remat,
    "shard_map": _shard_map,
    "closed_call": _closed_call, "core_call": _closed_call,
    "scatter": _scatter, "scatter-add": _scatter,
}
_STRUCTURAL = {"jit", "pjit", "custom_jvp_call", "custom_vjp_call", "scan", "while", "cond", "remat2",
               "checkpoint", "shard_map", "closed_call", "core_call"}
_OPAQUE_SILENT = {"pallas_call", "mosaic_gpu_call", "triton_kernel_call"}
_CALLBACKS = {"pure_callback", "io_callback", "callback", "debug_callback", "ffi_call"}


def _warn_opaque(name: str) -> None:
    warnings.warn(f"dualprec_jax.autocast cannot see into '{name}'; it runs with the dtypes it "
                  "was traced with (no op policy inside it)", AutocastWarning, stacklevel=4)


def _has_subjaxpr(eqn) -> bool:
    return any(isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in eqn.params.values())


@functools.lru_cache(maxsize=None)
def _jax_primitive_ids() -> frozenset:
    """Every primitive JAX itself defines (anything else is a user's custom primitive)."""
    found = set()
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name.startswith("jax.") or mod_name.startswith("jaxlib.")) \
                or mod_name.startswith("jax.experimental.pallas"):
            continue
        for value in list(vars(mod).values()):
            if isinstance(value, core.Primitive):
                found.add(id(value))
    return frozenset(found)


def _is_jax_primitive(prim) -> bool:
    if id(prim) in _jax_primitive_ids():
        return True
    _jax_primitive_ids.cache_clear()  # a jax module imported since: look again once
    return id(prim) in _jax_primitive_ids()


def _flax_context(policy: Policy):
    if "flax.linen" not in sys.modules:
        return contextlib.nullcontext()
    from . import flax_linen  # stock linen layers: param dtypes, the bias before the rounding

    return flax_linen.autocast(policy)


# ----- tracing under a policy ----------------------------------------------------------------
# JAX caches the traces of jitted functions by their arguments and a "trace context"; this
# user context puts the policy in that key, so a jitted helper traced inside an autocast
# trace (with the linen interceptor active) is traced again outside it or under
# another policy, never reused (and one traced before, outside, is traced again inside).
_TRACE_KEY = jax.make_user_context(None)
_ACTIVE = threading.local()  # .policy: the autocast trace running in this thread (or None)


def tracing_policy() -> Policy | None:
    """The policy whose autocast trace is running in this thread (None outside one)."""
    return getattr(_ACTIVE, "policy", None)


@contextlib.contextmanager
def _tracing(policy: Policy):
    """While ``fun`` is traced: the trace-cache key and the policy of this thread's trace
    (read by the linen interceptor and `module_scope`; no module attribute is replaced)."""
    saved = tracing_policy()
    _ACTIVE.policy = policy
    try:
        with _TRACE_KEY(("dualprec", str(policy))):
            yield
    finally:
        _ACTIVE.policy = saved


_PINNED = "dualprec_pinned_dtype"


def _pinned(x):
    return x


_pinned.__name__ = _pinned.__qualname__ = _PINNED


def pin_dtype(tree, dtype=None):
    """``tree``'s floating leaves (cast to ``dtype`` if given) held at their dtypes: inside an
    autocast trace a cast that is a no-op at trace time (a float32 matmul cast to a float32
    output dtype) leaves nothing in the jaxpr, and the table would make the matmul bfloat16;
    the leaves are put behind a named boundary the evaluator casts back to the traced dtype."""
    from .casts import cast_floating

    if dtype is not None:
        tree = cast_floating(tree, dtype, "cast_to_output")
    if tracing_policy() is None:
        return tree
    pin = jax.jit(_pinned)
    return jax.tree_util.tree_map(
        lambda x: pin(x) if isinstance(x, jax.Array) and _is_float(x.dtype) else x, tree)


_SCOPES = threading.local()  # .stack: the policies of the enclosing scoped modules


@contextlib.contextmanager
def module_scope(policy: Policy, own: Policy):
    """For a module running under ``own`` (``policy.for_module(path)``), while an autocast
    trace runs in this thread: its ops in `policy_scope(own)` when ``own`` differs from the
    enclosing module's policy (the top-level one outside any override).  Outside a trace:
    nothing."""
    if tracing_policy() is None:
        yield
        return
    stack = getattr(_SCOPES, "stack", None)
    if stack is None:
        stack = _SCOPES.stack = []
    enclosing = stack[-1] if stack else _top(policy)
    stack.append(own)
    try:
        if own == enclosing:
            yield
        else:  # traces of jitted helpers made in here are kept apart from the enclosing ones
            with policy_scope(own), _TRACE_KEY(("dualprec", str(policy), str(own))):
                yield
    finally:
        stack.pop()


def _needs_table(policy: Policy) -> bool:
    return policy.uses_mixed


# ----- the transformation --------------------------------------------------------------------
def _is_traced_leaf(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or \
        (hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type))


def autocast(fun, policy, *, context=None, cache=None):
    """``fun`` run under the op table of ``policy`` (a Policy or a policy string).

    Array leaves of the arguments are traced; other leaves (Python numbers, strings, flags)
    are passed as they are.  Under a policy that is not mixed (and has no mixed override)
    the table is not applied (as ``torch.autocast`` is off for "32-true" and "bf16-true"):
    ``fun`` runs as written, stock Flax linen layers still get the policy's parameter dtypes.

    ``context``: a callable returning the context manager ``fun`` is traced in (default: the
    linen interceptor, which gives stock layers their parameter dtypes and the bias added
    before the one rounding; `Precision.autocast` passes its own, FP8/quantized layers too).

    Called while another autocast traces (a nested call), ``fun`` is traced as part of the
    outer trace: under the same policy nothing more is done; under another policy its ops are
    scoped (`policy_scope`) and the outer evaluation applies that policy's table to them.

    ``cache``: a `TraceCache` and the key of ``fun`` in it (``(cache, key)``), for callers that
    re-create the wrapper on every call (`Precision.apply`): the trace is reused for the same
    key, argument structure, array shapes/dtypes and non-array arguments.  Like ``jax.jit``,
    a cached trace does not re-run ``fun``'s Python.

        step = jax.jit(jax.grad(dualprec_jax.autocast(loss_fn, "bf16-mixed")))
    """
    policy = Policy.parse(policy)
    context = context or functools.partial(_flax_context, policy)
    table = _needs_table(policy)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        outer = tracing_policy()
        if outer is not None:  # nested: part of the outer trace
            scope = contextlib.nullcontext() if outer == policy else policy_scope(_top(policy))
            with scope, context():
                return fun(*args, **kwargs)
        if not table:
            with context():
                return fun(*args, **kwargs)
        ctx = _Ctx(_top(policy))
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        traced = [i for i, x in enumerate(leaves) if _is_traced_leaf(x)]

        def flat(*arrays):
            filled = list(leaves)
            for i, a in zip(traced, arrays):
                filled[i] = a
            a, k = jax.tree_util.tree_unflatten(tree, filled)
            return fun(*a, **k)

        arrays = [leaves[i] for i in traced]
        key = None
        if cache is not None and not any(isinstance(a, jax.core.Tracer) for a in arrays):
            key = _cache_key(cache[1], policy, tree, leaves, traced)
        hit = cache[0].get(key) if key is not None else None
        if hit is None:
            with _tracing(policy), context():
                closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*arrays)
            hit = closed, jax.tree_util.tree_structure(out_shape)
            if key is not None:
                cache[0].put(key, hit)
        closed, out_tree = hit
        outs = _eval_closed(closed, arrays, ctx)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    return wrapped


class TraceCache:
    """The last ``size`` autocast traces of eager calls (`autocast`'s ``cache=``), by key."""

    def __init__(self, size: int = 32):
        self.size, self._items, self.misses = size, {}, 0
        self._lock = threading.Lock()

    def __reduce__(self):  # a copied or pickled Precision starts with an empty cache
        return TraceCache, (self.size,)

    def get(self, key):
        with self._lock:
            hit = self._items.pop(key, None)
            if hit is not None:
                self._items[key] = hit  # most recent last
            else:
                self.misses += 1
            return hit

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))


def _cache_key(fun_key, policy, tree, leaves, traced):
    """(fun, policy, argument structure, avals of the arrays, the other leaves), or None when a
    non-array leaf cannot be hashed (no cache then)."""
    traced_set = set(traced)
    # the dtype object itself: extended dtypes (Flax's fp8_meta32) are no numpy dtype names
    avals = tuple((tuple(leaves[i].shape), leaves[i].dtype, bool(getattr(leaves[i], "weak_type", False)))
                  for i in traced)
    static = tuple(x for i, x in enumerate(leaves) if i not in traced_set)
    key = (fun_key, str(policy), tree, avals, static)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _top(policy: Policy) -> Policy:
    """The top-level policy without its overrides (what unscoped ops run under)."""
    return policy.policies()[0][1]
