"""Tolerances of the tolerance tier, derived from the arithmetic (an error model), not
measured on one machine.

Two correct implementations of a policy differ only where the arithmetic leaves them free:
the order in which a reduction (a GEMM's K, a convolution's window, a norm's axis, a sum)
adds its terms, and the last bits of a transcendental function (exp, erf, rsqrt).  Every
kernel (AVX512, AVX2, SSE, oneDNN, Eigen, cuBLAS split-K) makes other choices, so a bound
that holds "on every machine where the frameworks are correct" must follow from those two
freedoms alone.  With u(d) the unit roundoff of dtype d (float32 2^-24, bfloat16 2^-8,
float16 2^-11, float64 2^-53), a reduction of length K accumulated in dtype a may differ
between two orders by

    acc(K) = C_ACC * sqrt(K) * u(a) + C_LIBM * u(a)            (relative to the data's scale)

(the statistical bound for round-to-nearest sums of random-signed terms, with a factor 4 of
margin; the second term is a few ULP of libm).  Under TF32 (a GPU whose float32 matmuls round
their operands to 10 mantissa bits) the operand rounding adds ``2 * sqrt(K) * u_tf32`` per
GEMM, so TF32 runs get their own, wider bound (and a TF32 run is never compared with a
strict float32 one: see :func:`check_math_modes`).

A tensor is judged in two ways:

* **max**: its largest error, in ULP of the tensor's own dtype measured at
  max(|ref|, mean|ref|), must stay under the bound;
* **share** (layer-isolated half-precision outputs only): a half-precision output is the
  *same* float32 sum rounded once, so two sides differ on an element only when their sums
  straddle a rounding boundary of the half dtype.  That happens with probability at most
  ``n_round * acc(K) / u(half)`` per element (the sums differ by acc(K), boundaries are
  2 u(half) apart).  The number of elements that differ may exceed its expectation only by a
  binomial margin (3 standard deviations + 3).  A bug that moves many elements by one
  rounding (statistics in half precision, the bias added after rounding, a GEMM accumulated
  in bfloat16) moves far more than that; a correct pair on any machine moves fewer.

Checks downstream of several layers (``forward``, ``gradients``, ``train-*``) carry the
differences of every layer before them, so their tensors get a magnitude bound only
(no share criterion: how many elements an upstream one-ULP flip touches depends on the
kernel):

    tol_forward = 2 * eps(c) * sqrt(n_round) + C_ACC * eps(a) * sqrt(n_reduce) * n_layers

relative (eps = 2u, c the narrowest compute/output dtype, n_round rounding stages on the
longest path, n_reduce the longest reduction, n_layers matmul-like layers); gradients run the
chain twice (2x); the loss at step t (1 + t)x, parameters after N steps (1 + N)x the gradient
bound.  The layer-isolated check and the loss-consistency check (each side's loss against a
float64 cross-entropy of its own outputs) are where the tight bounds live.
"""

from __future__ import annotations

import dataclasses
import math

from dualprec import Policy

from .numerics import eps

#: statistical reduction bound factor (4 standard deviations)
C_ACC = 4.0
#: ULPs of the accumulation dtype a transcendental function may differ by between libms
C_LIBM = 4.0
#: a block with submodules (attention, an MLP) run in isolation: its reductions in sequence
#: and the roundings inside it (qkv, scores, softmax, probs @ v, the projection)
BLOCK_DEPTH, BLOCK_ROUNDINGS = 3, 5
#: unit roundoff of a TF32 operand (10 explicit mantissa bits)
U_TF32 = 2.0 ** -11


def unit(dtype: str) -> float:
    """Unit roundoff u (half the distance from 1.0 to the next float) of a spec dtype."""
    return eps(dtype) / 2


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the tolerance formula needs to know about a model."""

    n_round: int     # rounding stages on the longest forward path (matmuls, activations, norms)
    n_reduce: int    # longest reduction (dot-product length, norm width, pooled count)
    n_layers: int    # matmul-like layers on the longest path


@dataclasses.dataclass(frozen=True)
class Tolerance:
    compute_dtype: str
    accumulate_dtype: str
    forward: float
    grad: float

    def loss_at(self, step: int) -> float:
        return self.forward * (1 + step)

    def params_after(self, steps: int) -> float:
        return self.grad * (1 + steps)


def narrowest_compute(policy: Policy) -> str:
    """The compute or output dtype with the fewest mantissa bits among the policy and its
    overrides: 64-true computes in float64 but rounds its outputs (and so the loss and every
    gradient) to float32, so float32 bounds what the two sides can agree on."""
    dts = [d for p in (policy, *(sub for _, sub in policy.overrides)) for d in (p.compute_dtype, p.output_dtype)]
    return max(dts, key=eps)


def accumulate_dtype(policy: Policy) -> str:
    return "float64" if narrowest_compute(policy) == "float64" else "float32"


def acc_rel(policy: Policy, k: int, depth: float = 1.0, math_mode: str = "ieee") -> float:
    """How far two summation orders of a length-``k`` reduction may put a result apart,
    relative to the data's scale, over ``depth`` reductions in sequence."""
    a = accumulate_dtype(policy)
    per = C_ACC * math.sqrt(k) * unit(a) + C_LIBM * unit(a)
    if math_mode == "tf32" and a == "float32":
        per += 2 * C_ACC * math.sqrt(k) * U_TF32
    return per * depth


#: relative step of an int8 activation code (absmax / 127) at the data's scale, times 2: one
#: flipped code per layer where a one-ULP difference upstream crosses a code boundary
INT8_CODE_STEP = 2.0 / 127


#: relative code step of an FP8 activation (E4M3: 3 mantissa bits; E5M2 gradients: 2) and of
#: an NVFP4 one (E2M1: 1 mantissa bit), per flipped code
FP8_CODE_STEP, FP4_CODE_STEP = 2.0 ** -2, 2.0 ** -1


def activation_code_step(policy: Policy) -> float:
    """The largest relative step of a quantized-activation code under ``policy`` and its
    overrides (0 when no activation is quantized): LLM.int8, FP8 and NVFP4 recipes."""
    step = 0.0
    for p in (policy, *(sub for _, sub in policy.overrides)):
        if p.quantization and p.quantization.mode.startswith("int8"):
            step = max(step, INT8_CODE_STEP)
        if p.fp8:
            step = max(step, FP4_CODE_STEP if p.fp8.scaling == "nvfp4" else FP8_CODE_STEP)
    return step


def tolerance(policy: Policy, shape: ModelShape, math_mode: str = "ieee",
              quantized_activations: bool | float = False) -> Tolerance:
    """The magnitude bounds (relative) of the checks downstream of several layers.

    ``quantized_activations`` (LLM.int8, FP8, NVFP4): a one-ULP difference upstream may move
    an activation code, one code step per layer on the path (True: int8's step; a float:
    that relative step, see :func:`activation_code_step`)."""
    c = narrowest_compute(policy)
    acc = accumulate_dtype(policy)
    e_acc = eps(acc) + (2 * U_TF32 * 2 if math_mode == "tf32" and acc == "float32" else 0.0)
    fwd = 2 * eps(c) * math.sqrt(shape.n_round) + C_ACC * e_acc * math.sqrt(shape.n_reduce) * shape.n_layers
    if quantized_activations:
        step = INT8_CODE_STEP if quantized_activations is True else float(quantized_activations)
        fwd += step * shape.n_layers
    return Tolerance(c, acc, fwd, 2 * fwd)


def binomial_upper(p: float, n: int) -> float:
    """A fraction of ``n`` elements that a Binomial(n, p) count exceeds with negligible
    probability: (n p + 3 sqrt(n p (1 - p)) + 3) / n, at most 1."""
    if n <= 0:
        return 1.0
    p = min(max(p, 0.0), 1.0)
    mean = n * p
    return min(1.0, (mean + 3 * math.sqrt(mean * (1 - p)) + 3) / n)


@dataclasses.dataclass(frozen=True)
class Bound:
    """What one compared tensor may legitimately differ by, and why.

    ``max_ulp``: ULP of the tensor's dtype at max(|ref|, mean|ref|) (None: judged by
    ``max_rel`` instead); ``max_rel``: |got - ref| / (|ref| + mean|ref|) (None: not used);
    ``max_neq``: the share of elements allowed to differ bitwise (None: no share criterion);
    ``median_ulp``: the bound of the median element's error, in the unit of ``max_ulp``."""

    why: str
    max_ulp: float | None = None
    max_rel: float | None = None
    max_neq: float | None = None
    median_ulp: float | None = None

    @property
    def shown(self) -> float:
        """The number a record shows as its tolerance."""
        return self.max_ulp if self.max_ulp is not None else (self.max_rel or 0.0)

    def judge(self, st) -> str | None:
        """None when ``st`` (numerics.Stats) is within the bound, else why not (one line)."""
        if not st.ok_shape:
            return "shape mismatch"
        if st.nan_mismatch:
            return f"{st.nan_mismatch} non-finite mismatches"
        if self.max_ulp is not None and st.max_ulp > self.max_ulp:
            return f"{st.max_ulp:.3g} ULP of {st.dtype} > bound {self.max_ulp:.3g} ({self.why})"
        if self.max_rel is not None and st.max_rel > self.max_rel:
            return (f"max rel {st.max_rel:.3g} ({st.max_ulp:.3g} ULP of {st.dtype}) > bound "
                    f"{self.max_rel:.3g} ({self.why})")
        if self.max_neq is not None and st.neq_frac > self.max_neq:
            return (f"{st.neq_frac:.1%} of elements not bitwise equal > bound {self.max_neq:.1%} "
                    f"(max {st.max_ulp:.3g} ULP of {st.dtype}; {self.why})")
        if self.median_ulp is not None and st.p50_ulp > self.median_ulp:
            return (f"median element {st.p50_ulp:.3g} ULP of {st.dtype} > bound {self.median_ulp:.3g} "
                    f"(max {st.max_ulp:.3g}; {self.why})")
        return None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _is_half(dtype: str) -> bool:
    return dtype in ("bfloat16", "float16")


def layer_bound(policy: Policy, shape: ModelShape, dtype: str, size: int, leaf: bool = True,
                math_mode: str = "ieee", share: bool = True, code_step: float = 0.0,
                own_ops: bool = False) -> Bound:
    """The bound of one layer (``leaf``) or block run in isolation on the other side's input.

    A half-precision output: at most ``n_round`` ULP (each rounding inside may flip once) and
    the binomial share of flips; a float32/float64 output: the reduction bound in its own ULP.
    ``share=False`` drops the share criterion (quantized activations: one ULP upstream of an
    int8 code moves an output by a code step).

    ``own_ops``: a block's own ops alone (its submodules' outputs shared, see
    ``Session.run_glue``).  A wider-than-half output of them gets, besides the maximum, a
    median criterion: its median element within the float32 bound ``2 acc / u + 1``.  Every
    input of those ops is shared, so only a half-precision rounding among the ops themselves
    (probability ``n_round * acc / u(half)`` per element) can move an element further; as long
    as such flips reach fewer than half of the elements, the median element holds float32
    agreement.  A function that moves most elements by more (a tanh GELU, a norm's epsilon)
    fails it, where the maximum (one half-precision rounding may flip) hides it."""
    depth = 1 if leaf else BLOCK_DEPTH
    n_round = 1 if leaf else BLOCK_ROUNDINGS
    acc = acc_rel(policy, shape.n_reduce, depth, math_mode)
    u_t = unit(dtype) if dtype in ("float64", "float32", "bfloat16", "float16") else unit("float32")
    # inside a block, a quantized activation (int8, FP8, NVFP4) made from a value that differs by
    # a rounding may land on the next code: a code step per rounding, and no share criterion
    codes = 0.0 if leaf else n_round * code_step / (2 * u_t)
    share = share and (leaf or not code_step)
    if _is_half(dtype) and u_t > unit(accumulate_dtype(policy)):
        p = min(1.0, n_round * acc / u_t)
        return Bound(f"{n_round} rounding(s) of {dtype} after K={shape.n_reduce} sums"
                     + (", code steps" if codes else ""),
                     max_ulp=n_round + 2 * acc / u_t + codes,
                     max_neq=binomial_upper(p, size) if share else None)
    c = narrowest_compute(policy)
    inner = 0.0
    if not leaf and _is_half(c) and unit(c) > u_t:
        # a block whose own roundings are half precision but whose output is wider
        inner = n_round * 2 * unit(c) / u_t
    median = 2 * acc / u_t + codes + 1 if own_ops and inner and share else None
    return Bound(f"K={shape.n_reduce} sums in {accumulate_dtype(policy)}"
                 + (f", {n_round} {c} rounding(s) may flip" if inner else ""),
                 max_ulp=2 * acc / u_t + inner + codes + 1, median_ulp=median)


def chain_bound(rel: float, why: str) -> Bound:
    """A magnitude-only bound for tensors downstream of several layers."""
    return Bound(why, max_rel=rel)


# ---------------------------------------------------------------- float32 math modes
MATH_MODES = ("ieee", "tf32", "bf16")


class MathModeMismatch(RuntimeError):
    """The two backends compute float32 matmuls in different arithmetics (one in IEEE
    float32, one in TF32 or bfloat16 passes): a numerical comparison would fail for that
    reason alone, so the suite refuses it."""


_FIX = {"torch": {"ieee": "torch.set_float32_matmul_precision('highest')",
                  "tf32": "torch.set_float32_matmul_precision('high')"},
        "jax": {"ieee": "jax.config.update('jax_default_matmul_precision', 'highest')",
                "tf32": "jax.config.update('jax_default_matmul_precision', 'tensorfloat32')"}}


def check_math_modes(modes: dict[str, str]) -> str:
    """The common float32 matmul mode of the backends (``{"torch": "ieee", "jax": "tf32"}``),
    or :class:`MathModeMismatch` naming both and how to align them."""
    distinct = set(modes.values())
    if len(distinct) <= 1:
        return distinct.pop() if distinct else "ieee"
    names = ", ".join(f"{k} computes float32 matmuls in {v.upper()}" for k, v in modes.items())
    fixes = [f for be, m in modes.items() for want in distinct - {m}
             for f in [_FIX.get(be, {}).get(want)] if f]
    raise MathModeMismatch(f"{names}: refusing to compare a {' run with a '.join(sorted(distinct))} run "
                           f"(the difference would be the math mode, not a bug); align them, e.g. "
                           + " or ".join(fixes or ["run both strict float32"]))
