"""Mutation testing: plausible precision bugs injected into one backend, and the run that
checks the suite flags every one of them.

Each :class:`Mutant` is a context manager that monkeypatches a backend's internals (or a
zoo twin) for the duration of one run, and names the part of the matrix it matters for
(the policies and models under which the bug changes anything: a growth-factor bug cannot
show in a run that never grows the scale).  ``python -m conformance.mutants`` (or
``dualprec conformance --mutants``) runs the unmutated subset once (it must be green),
then each mutant's subset with fresh backends, and prints which check killed it and the
kill rate; exit status 0 only when the clean run passes and every mutant is killed.

A mutant is *killed* when at least one record of its run fails or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Callable, Iterator


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    backend: str                      # "jax", "torch" or "twin" (the zoo's Flax model)
    description: str
    patch: Callable[[], contextlib.AbstractContextManager]
    policies: tuple[str, ...]
    models: tuple[str, ...] = ("mlp",)


@contextlib.contextmanager
def _setattr(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _fresh_op_dtypes() -> Iterator[None]:
    """dualprec_jax resolves a policy's dtypes once (lru_cache): drop them around a mutant."""
    from dualprec_jax import ops

    ops.op_dtypes.cache_clear()
    try:
        yield
    finally:
        ops.op_dtypes.cache_clear()


@contextlib.contextmanager
def _patch_op_dtypes(edit: Callable) -> Iterator[None]:
    from dualprec_jax import ops

    orig = ops.OpDtypes.__init__

    def init(self, policy):
        orig(self, policy)
        edit(self, policy)

    with _fresh_op_dtypes(), _setattr(ops.OpDtypes, "__init__", init):
        yield


# ---------------------------------------------------------------- JAX backend bugs
def norm_half():
    def edit(d, policy):
        d.norm = d.compute  # statistics in the compute dtype; the output cast is unchanged
    return _patch_op_dtypes(edit)


def norm_output_unrounded():
    def edit(d, policy):
        d.norm_output = d.norm  # "-true" policies keep float32 norm outputs
    return _patch_op_dtypes(edit)


@contextlib.contextmanager
def matmul_output_uncast():
    from dualprec_jax import flax_linen as fl

    orig = fl._intercept

    def intercept(policy, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, fl.MATMUL_MODULES):
            d = fl.op_dtypes(policy.for_module(fl.module_path(module)))
            with fl._knobs(module, fl._matmul_knobs(module, d)):
                return next_fun(*args, **kwargs)  # the float32 sum leaves the layer unrounded
        return orig(policy, next_fun, args, kwargs, context)

    with _fresh_op_dtypes(), _setattr(fl, "_intercept", intercept):
        yield


@contextlib.contextmanager
def bias_after_rounding():
    from dualprec_jax import flax_linen as fl

    dot, conv = fl.accumulating_dot_general, fl.accumulating_conv

    def rounded(factory):
        def make(accumulate):
            inner = factory(accumulate)
            return lambda lhs, rhs, *a, **k: inner(lhs, rhs, *a, **k).astype(lhs.dtype)
        return make

    with _fresh_op_dtypes(), _setattr(fl, "accumulating_dot_general", rounded(dot)), \
            _setattr(fl, "accumulating_conv", rounded(conv)):
        yield


def softmax_half():
    """dualprec_jax.ops.softmax with its exponentials and sum in the input (half) dtype: explicit
    casts, which the one-path op table cannot undo (a plain jax.nn.softmax now gets the table's
    float32 rule inside Precision.apply, so it is no longer a bug there)."""
    import jax.numpy as jnp

    from dualprec_jax import ops

    def softmax(x, axis=-1):
        e = jnp.exp(x - x.max(axis, keepdims=True)).astype(x.dtype)
        return (e / e.sum(axis, keepdims=True).astype(x.dtype)).astype(x.dtype)

    return _setattr(ops, "softmax", softmax)


@contextlib.contextmanager
def override_ignored():
    from dualprec_jax import flax_linen as fl

    orig = fl._intercept

    def intercept(policy, *rest):  # the layers get the top-level policy, overrides dropped
        return orig(dataclasses.replace(policy, overrides=()), *rest)

    with _fresh_op_dtypes(), _setattr(fl, "_intercept", intercept):
        yield


@contextlib.contextmanager
def x64_in_float32():
    import jax.numpy as jnp

    from dualprec_jax import casts

    with _fresh_op_dtypes():
        old = casts._DTYPES["float64"]
        casts._DTYPES["float64"] = jnp.float32
        try:
            yield
        finally:
            casts._DTYPES["float64"] = old


@contextlib.contextmanager
def outputs_not_cast():
    import dualprec_jax

    cls = dualprec_jax.Precision
    with _setattr(cls, "cast_to_output", lambda self, tree: tree), \
            _setattr(cls, "convert_output", lambda self, tree: tree):
        yield


def _loss_scale_config(**change):
    from dualprec_jax import optim

    orig = optim.loss_scale_update

    def update(state, finite, config):
        return orig(state, finite, dataclasses.replace(config, **change))

    return _setattr(optim, "loss_scale_update", update)


def growth_factor_wrong():
    return _loss_scale_config(growth_factor=4.0)


def backoff_factor_wrong():
    return _loss_scale_config(backoff_factor=0.25)


def counter_kept_on_skip():
    import jax.numpy as jnp

    from dualprec_jax import optim

    orig = optim.loss_scale_update

    def update(state, finite, config):
        new = orig(state, finite, config)
        if config.kind != "dynamic":
            return new
        return new._replace(counter=jnp.where(finite, new.counter, state.counter).astype(jnp.int32))

    return _setattr(optim, "loss_scale_update", update)


def skip_advances_optimizer():
    from dualprec_jax import optim

    return _setattr(optim, "_select", lambda keep_new, new, old: new)


def unscale_rounded_reciprocal():
    import jax
    import jax.numpy as jnp

    from dualprec_jax import optim

    def unscale(grads, state):
        inv = (jnp.float32(1.0) / state.scale).astype(jnp.bfloat16).astype(jnp.float32)
        return jax.tree_util.tree_map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)) * inv, grads)

    return _setattr(optim, "unscale", unscale)


def master_not_copied_back():
    import jax
    import jax.numpy as jnp

    from dualprec_jax import optim

    return _setattr(optim, "_move_to", lambda params, targets: jax.tree_util.tree_map(
        lambda p: jnp.zeros(p.shape, jnp.float32), params))


# ---------------------------------------------------------------- torch backend bugs
@contextlib.contextmanager
def torch_backoff_wrong():
    from dualprec_torch.loss_scale import LossScaler

    orig = LossScaler._updated  # behind both update() and the read-only peek()

    def updated(self, found_infs):
        saved = self.config
        self.config = dataclasses.replace(saved, backoff_factor=0.25)
        try:
            return orig(self, found_infs)
        finally:
            self.config = saved

    with _setattr(LossScaler, "_updated", updated):
        yield


def torch_outputs_not_cast():
    import dualprec_torch

    return _setattr(dualprec_torch.Precision, "convert_output", lambda self, data: data)


def torch_inputs_not_cast():
    import dualprec_torch

    return _setattr(dualprec_torch.Precision, "convert_input", lambda self, data: data)


# ---------------------------------------------------------------- FP8 and block-scaled recipe bugs
@contextlib.contextmanager
def _fresh_jax_traces() -> Iterator[None]:
    """The block-scaled and FP8 dots are traced once per recipe (module-level ``jax.jit`` and
    ``lru_cache``): drop every compiled trace around a mutant so that the patch is traced in,
    and again afterwards so that it is traced out."""
    import jax

    from dualprec_jax import fp8

    jax.clear_caches()
    fp8._delayed_dot.cache_clear()
    try:
        yield
    finally:
        jax.clear_caches()
        fp8._delayed_dot.cache_clear()


@contextlib.contextmanager
def mx_scale_floor():
    """JAX rounds MX scales with FLOOR where the recipe says RCEIL (``to_mx``'s default)."""
    from dualprec_jax import blockscale as bs

    orig = bs.mx_quantize

    def mx_quantize(x, rounding="rceil", fmt="float8_e4m3fn", block=32):
        return orig(x, "floor" if rounding == "rceil" else rounding, fmt, block)

    with _fresh_jax_traces(), _setattr(bs, "mx_quantize", mx_quantize):
        yield


@contextlib.contextmanager
def torch_mx_block_axis_swapped():
    """torch's MX blocks run along the first dimension of each 2-D operand (32 rows of a column
    share a scale) instead of along the contracting (last) dimension; dequantization is
    consistent with it, so only the choice of blocks is wrong."""
    from dualprec_torch import blockscale as bs

    q_orig, dq_orig = bs.mx_quantize, bs.mx_dequantize

    def mx_quantize(x, rounding="rceil", fmt="float8_e4m3fn", block=32):
        sc, q = q_orig(x.T.contiguous(), rounding, fmt, block)
        return sc, q.T

    def mx_dequantize(biased, codes, block=32):
        return dq_orig(biased, codes.T.contiguous(), block).T

    with _setattr(bs, "mx_quantize", mx_quantize), _setattr(bs, "mx_dequantize", mx_dequantize):
        yield


@contextlib.contextmanager
def delayed_scale_late():
    """JAX's delayed scaling quantizes with the scale stored last step instead of the one
    recomputed from the history that includes last step's amax (one step late)."""
    from dualprec_jax import fp8

    with _fresh_jax_traces(), _setattr(fp8, "next_scale", lambda scale, history, role, recipe: fp8._to_f32(scale)):
        yield


@contextlib.contextmanager
def torch_sr_wrong_stream():
    """torch's NVFP4 stochastic rounding draws its bits from another stream of the seed (the
    output gradient's stream for the transposed one and vice versa)."""
    from dualprec_torch import blockscale as bs

    orig = bs.sr_uniform24

    def sr_uniform24(seed, stream, shape):
        return orig(seed, stream ^ 1, shape)

    with _setattr(bs, "sr_uniform24", sr_uniform24):
        yield


@contextlib.contextmanager
def nvfp4_single_level():
    """JAX's NVFP4 drops the float32 tensor scale: E4M3 block scales alone (qwix's "nvfp4")."""
    from dualprec_jax import blockscale as bs

    q_orig, dq_orig = bs.nvfp4_quantize, bs.nvfp4_dequantize
    q2_orig, dq2_orig = bs.nvfp4_quantize_2d, bs.nvfp4_dequantize_2d
    one = lambda ts: None if ts is None else ts * 0 + 1  # noqa: E731 (the tensor scale as 1)

    with _fresh_jax_traces(), \
            _setattr(bs, "nvfp4_quantize", lambda x, ts=None, u24=None, block=16: q_orig(x, None, u24, block)), \
            _setattr(bs, "nvfp4_dequantize", lambda s8, c, ts=None, block=16: dq_orig(s8, c, None, block)), \
            _setattr(bs, "nvfp4_quantize_2d", lambda w, ts, tile=16: q2_orig(w, one(ts), tile)), \
            _setattr(bs, "nvfp4_dequantize_2d", lambda s8, c, ts, tile=16: dq2_orig(s8, c, one(ts), tile)):
        yield


# ---------------------------------------------------------------- twin bugs (not listed anywhere)
def twin_gelu_tanh():
    import jax

    from .zoo import flax_models

    return _setattr(flax_models, "gelu", lambda x: jax.nn.gelu(x, approximate=True))


def twin_layernorm_eps():
    from .zoo import flax_models

    return _setattr(flax_models, "LN_EPS", 1e-6)


# ---------------------------------------------------------------- bugs at the size of a real precision bug
# (a loose float32 bound could let these through: each moves values by a few half-precision
# roundings, not by orders of magnitude)
def _intercept(kind, name: str | None, compute):
    """A Flax method interceptor replacing the output of ``kind`` modules (named ``name``)
    with ``compute(module, args, correct_output)`` once the parameters exist."""
    import flax.linen as nn

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        y = next_fun(*args, **kwargs)
        if (context.method_name != "__call__" or not isinstance(m, kind) or (name and m.name != name)
                or m.is_initializing()):
            return y
        return compute(m, args, y)

    return nn.intercept_methods(interceptor)


def gemm_bf16_accumulate():
    """The MLP's fc2 sums its products in bfloat16 (each partial sum rounded) instead of float32."""
    import flax.linen as nn
    import jax.numpy as jnp

    def compute(m, args, y):
        opd = y.dtype  # the operand dtype the op table chose (the compute dtype)
        x = args[0].astype(opd).astype(jnp.float32)
        k = m.get_variable("params", "kernel").astype(opd).astype(jnp.float32)
        acc = jnp.zeros(y.shape, jnp.bfloat16)
        for i in range(k.shape[0]):
            acc = (acc.astype(jnp.float32) + x[..., i, None] * k[i]).astype(jnp.bfloat16)
        b = m.get_variable("params", "bias").astype(opd).astype(jnp.float32)
        return (acc.astype(jnp.float32) + b).astype(y.dtype)

    return _intercept(nn.Dense, "fc2", compute)


def layernorm_var_half():
    """LayerNorm's variance rounded to float16 (its squares summed in float32)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def compute(m, args, y):
        x = args[0].astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True).astype(jnp.float16).astype(jnp.float32)
        out = (x - mean) * jax.lax.rsqrt(var + m.epsilon)
        out = out * m.get_variable("params", "scale").astype(jnp.float32) + \
            m.get_variable("params", "bias").astype(jnp.float32)
        return out.astype(y.dtype)

    return _intercept(nn.LayerNorm, None, compute)


def loss_bf16():
    """The loss computed in bfloat16 from bfloat16 logits."""
    import jax.numpy as jnp
    import optax

    orig = optax.softmax_cross_entropy_with_integer_labels

    def loss(logits, labels, *a, **k):
        return orig(logits.astype(jnp.bfloat16), labels, *a, **k).astype(logits.dtype)

    return _setattr(optax, "softmax_cross_entropy_with_integer_labels", loss)


HALF = ("16-mixed", "bf16-mixed", "bf16-true")
FLOAT = ("32-true", "16-mixed", "bf16-mixed")

MUTANTS: tuple[Mutant, ...] = (
    Mutant("norm-stats-half", "jax", "LayerNorm/RMSNorm/GroupNorm statistics in the compute dtype",
           norm_half, HALF, ("transformer", "cnn")),
    Mutant("norm-output-unrounded", "jax", "under -true policies the norm output stays float32",
           norm_output_unrounded, ("bf16-true",), ("cnn",)),
    Mutant("matmul-output-uncast", "jax", "Dense/Conv return their float32 sum, not the compute dtype",
           matmul_output_uncast, ("bf16-mixed", "16-mixed")),
    Mutant("bias-after-rounding", "jax", "the product is rounded to the compute dtype before the bias is added",
           bias_after_rounding, HALF),
    Mutant("softmax-half", "jax", "dualprec_jax.ops.softmax computes in the input (half) dtype",
           softmax_half, ("bf16-mixed", "16-mixed"), ("transformer",)),
    Mutant("override-ignored", "jax", "per-module overrides (@head=...) are not applied to layers",
           override_ignored, ("bf16-mixed+head-f32",)),
    Mutant("x64-computes-float32", "jax", "a float64 policy silently computes in float32",
           x64_in_float32, ("64-true", "float64")),
    Mutant("outputs-not-cast", "jax", "convert_output leaves model outputs in the compute dtype",
           outputs_not_cast, ("bf16-mixed",)),
    Mutant("growth-factor", "jax", "the loss scale grows by 4 instead of 2",
           growth_factor_wrong, ("16-mixed+growth2",)),
    Mutant("backoff-factor", "jax", "the loss scale backs off by 0.25 instead of 0.5",
           backoff_factor_wrong, ("16-mixed",)),
    Mutant("counter-kept-on-skip", "jax", "the growth counter is not reset after a skipped step",
           counter_kept_on_skip, ("16-mixed+growth2",)),
    Mutant("skip-advances-adam", "jax", "a skipped step still updates Adam's state (and step count)",
           skip_advances_optimizer, ("16-mixed",)),
    Mutant("unscale-rounded-reciprocal", "jax", "gradients unscaled by 1/scale rounded to bfloat16",
           unscale_rounded_reciprocal, ("16-mixed+growth2",)),
    Mutant("master-not-copied-back", "jax", "master weights are updated but never copied to the params",
           master_not_copied_back, ("bf16-true+master",)),
    Mutant("torch-backoff-factor", "torch", "GradScaler backoff 0.25 instead of 0.5",
           torch_backoff_wrong, ("16-mixed",)),
    Mutant("torch-outputs-not-cast", "torch", "convert_output leaves outputs in the compute dtype",
           torch_outputs_not_cast, ("bf16-mixed",)),
    Mutant("torch-inputs-not-cast", "torch", "convert_input leaves float32 inputs as they are",
           torch_inputs_not_cast, ("bf16-true",)),
    # (under half policies a tanh GELU is below what other kernels legitimately differ by: torch's
    # bfloat16 GELU on AVX512 uses oneDNN's erf and differs from float32's on ~3% of elements)
    Mutant("twin-gelu-tanh", "twin", "the Flax twin uses the tanh-approximated GELU",
           twin_gelu_tanh, ("32-true", *HALF)),
    Mutant("twin-layernorm-eps", "twin", "the Flax twin's LayerNorm epsilon is 1e-6, not 1e-5",
           twin_layernorm_eps, HALF, ("transformer",)),
    Mutant("gemm-bf16-accumulate", "twin", "the MLP's fc2 accumulates its products in bfloat16",
           gemm_bf16_accumulate, FLOAT),
    Mutant("layernorm-var-half", "twin", "LayerNorm's variance rounded to float16",
           layernorm_var_half, FLOAT, ("transformer",)),
    Mutant("loss-bf16", "jax", "the loss computed in bfloat16 from bfloat16 logits",
           loss_bf16, FLOAT),
    # one per FP8 / block-scaled recipe (docs/block-scaling.md, "Mutants")
    Mutant("mx-scale-floor", "jax", "MXFP8 scales rounded with FLOOR where the recipe says RCEIL",
           mx_scale_floor, ("bf16-mixed+mxfp8",)),
    Mutant("torch-mx-block-axis", "torch", "MXFP8 blocks along the wrong dimension of each operand",
           torch_mx_block_axis_swapped, ("bf16-mixed+mxfp8",)),
    Mutant("delayed-scale-late", "jax", "FP8 delayed scaling quantizes with last step's scale",
           delayed_scale_late, ("bf16-mixed+fp8",)),
    Mutant("torch-sr-wrong-stream", "torch", "NVFP4 stochastic rounding draws from another stream of the seed",
           torch_sr_wrong_stream, ("bf16-mixed+nvfp4",)),
    Mutant("nvfp4-single-level", "jax", "NVFP4 without its float32 tensor scale (E4M3 block scales only)",
           nvfp4_single_level, ("bf16-mixed+nvfp4",)),
)

#: The fast subset the CI test runs: mutant -> the one policy it runs under, on the MLP.
CI_SUBSET = {"bias-after-rounding": "bf16-true", "skip-advances-adam": "16-mixed",
             "outputs-not-cast": "bf16-mixed", "unscale-rounded-reciprocal": "16-mixed+growth2",
             "loss-bf16": "16-mixed", "gemm-bf16-accumulate": "bf16-mixed"}


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    by: list[str]            # "check@where" of the failing records
    seconds: float


def _policies(labels):
    """label -> Policy, float64 policies last (a JAX backend switches jax_enable_x64 on for
    the rest of the process for them)."""
    from . import matrix

    table = matrix.default_policies()
    out = {label: table[label] if label in table else matrix.resolve_policy(label)[1] for label in labels}
    return dict(sorted(out.items(), key=lambda kv: _x64(kv[1])))


def _x64(policy) -> bool:
    return bool(getattr(policy, "needs_x64", False))


def needs_x64(m: Mutant) -> bool:
    return any(_x64(p) for p in _policies(m.policies).values())


def _run(policies, models, steps, full_matrix):
    from . import matrix
    from .backends import default_backends

    if full_matrix:
        return matrix.run(None, steps=steps, backends=default_backends())
    return matrix.run(_policies(policies), list(models), steps=steps, backends=default_backends(), full=True)


def run_mutant(m: Mutant, steps: int = 3, full_matrix: bool = False, policies=None, models=None) -> Outcome:
    """Run ``m``'s subset (or the given ``policies``/``models``, or the whole default matrix)
    with ``m`` injected."""
    t0 = time.perf_counter()
    with m.patch():
        records = _run(policies or m.policies, models or m.models, steps, full_matrix)
    bad = [r for r in records if r.failed]
    by = [f"{r.policy}/{r.model}/{r.check}" + (f"@{r.where}" if r.where else "") for r in bad]
    return Outcome(m, bool(bad), by, time.perf_counter() - t0)


def clean_run(mutants, steps: int = 3, full_matrix: bool = False, policies=None, models=None):
    """The unmutated run over the union of the mutants' subsets: every record must pass."""
    policies = policies or tuple(dict.fromkeys(p for m in mutants for p in m.policies))
    models = models or tuple(dict.fromkeys(x for m in mutants for x in m.models))
    return _run(policies, models, steps, full_matrix)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.mutants",
                                description="Inject each known precision bug and check the suite catches it.")
    p.add_argument("--mutant", action="append", help="run only these (repeatable); --list shows them")
    p.add_argument("--list", action="store_true")
    p.add_argument("--full-matrix", action="store_true",
                   help="run the whole default matrix per mutant instead of its relevant subset")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28s} {m.backend:6s} {m.description}")
        return 0
    # mutants that need float64 run last: x64 stays on for the rest of the process
    chosen = sorted((m for m in MUTANTS if not args.mutant or m.name in args.mutant), key=needs_x64)
    unknown = set(args.mutant or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s): {', '.join(sorted(unknown))}; --list shows them", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    clean = clean_run(chosen, args.steps, args.full_matrix)
    red = [r for r in clean if r.failed]
    print(f"unmutated run: {len(clean) - len(red)} of {len(clean)} records pass"
          + (f"; FAILING: {', '.join(f'{r.policy}/{r.model}/{r.check}' for r in red[:5])}" if red else ""))
    outcomes = []
    for m in chosen:
        o = run_mutant(m, args.steps, args.full_matrix)
        outcomes.append(o)
        first = o.by[0] if o.by else "-"
        print(f"{'killed ' if o.killed else 'SURVIVED'} {m.name:27s} {m.backend:5s} {o.seconds:5.1f}s  by {first}"
              + (f" (+{len(o.by) - 1})" if len(o.by) > 1 else ""))
    killed = sum(o.killed for o in outcomes)
    print(f"kill rate: {killed}/{len(outcomes)} = {killed / max(len(outcomes), 1):.0%} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0 if killed == len(outcomes) and not red else 1


if __name__ == "__main__":
    sys.exit(main())
