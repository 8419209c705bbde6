"""The op policy as JAX functions, shared by the linen and nnx interceptors and by
`dualprec_jax.autocast`.

Matmul-like ops take compute-dtype operands, accumulate in float32 (``preferred_element_type``)
and are rounded to the compute dtype once, after the bias is added in float32: the numbers
torch autocast gives on CPU.  Normalisations and softmax run in float32 (float64 under a
float64 policy).  `torch_activation` is torch's activation formulas in float32, with which
autocast computes half-precision activations as torch's kernels do (one rounding).
"""

from __future__ import annotations

import functools
import inspect
import math
import string

import jax
import jax.numpy as jnp
from jax import lax

from dualprec import Policy

from .casts import accumulation_dtype, jax_dtype

__all__ = ["OpDtypes", "op_dtypes", "accumulating_dot_general", "accumulating_conv",
           "dot_product_attention", "softmax", "log_softmax", "torch_activation"]


class OpDtypes:
    """The JAX dtypes one module uses under a policy (resolved once per policy)."""

    def __init__(self, policy: Policy):
        self.param = jax_dtype(policy.param_dtype)
        self.compute = jax_dtype(policy.compute_dtype)
        self.output = jax_dtype(policy.output_dtype)
        self.accumulate = accumulation_dtype(policy.compute_dtype)
        self.norm = self.accumulate  # norms, softmax and losses: float32 (float64 under float64)
        # Mixed policies follow autocast's fp32 list (norm outputs stay float32, the next
        # matmul casts); pure ones round the norm output to the compute dtype, as a torch
        # module converted with .to(dtype) does.
        self.norm_output = self.norm if policy.is_mixed else self.compute
        # float32 compute means float32 matmuls: no TF32 on GPUs (torch's default too).
        self.precision = lax.Precision.HIGHEST if self.compute in (jnp.float32, jnp.float64) else None


@functools.lru_cache(maxsize=None)
def op_dtypes(policy: Policy) -> OpDtypes:
    return OpDtypes(policy)



def true_divide(a, b):
    """``a / b`` correctly rounded, as NumPy and torch divide.  XLA rewrites a division by a
    broadcast or a constant into a multiplication by its reciprocal (two roundings: on CPU
    ``x / 6.0`` differs from IEEE division on ~1/3 of float32 inputs); the divisor is passed
    and the dividend pass through an optimization barrier so the division stays one.  For codecs whose codes and
    scales must be bit-identical with the reference and torch."""
    a = jnp.asarray(a)
    b = jnp.broadcast_to(jnp.asarray(b, jnp.result_type(a, b)), jnp.broadcast_shapes(a.shape, jnp.shape(b)))
    # both operands: XLA also folds (x / c1) / c2 into x / (c1 * c2)
    a, b = lax.optimization_barrier((a, b))
    return a / b


#: The name of a jit region whose dtypes autocast keeps as written: no rule of the op table
#: applies inside (its float inputs are only brought to a common dtype).  The low-precision
#: GEMMs use it: an FP8 or block-scaled GEMM accumulates in float32 and is scaled before the
#: layer rounds its output once, whatever policy surrounds it.
AS_WRITTEN = "dualprec_explicit_dtype"


def as_written(fn, static_argnums=()):
    """``fn`` jitted as a region autocast leaves alone (`AS_WRITTEN`)."""

    @functools.wraps(fn)
    def region(*args):
        return fn(*args)

    region.__name__ = region.__qualname__ = AS_WRITTEN
    return jax.jit(region, static_argnums=static_argnums)

def accumulating_dot_general(accumulate):
    """lax.dot_general that accumulates (and returns) ``accumulate``.

    For half-precision operands the backward pass is torch autocast's: the layer rounds its
    output to the compute dtype, so the incoming cotangent holds compute-dtype values; it is
    taken in that dtype and both gradient products are half-precision GEMMs accumulated in
    ``accumulate`` and rounded once.  Autodiff of the forward alone would promote the
    cotangent and run both backward GEMMs in float32 (about 2x slower on GPUs).
    """

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        if kw.get("out_sharding", "absent") is None:
            del kw["out_sharding"]  # Flax passes out_sharding=None; the default sharding rule
        if kw or lhs.dtype != rhs.dtype or jnp.finfo(lhs.dtype).bits >= jnp.finfo(accumulate).bits:
            return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=accumulate, **kw)
        return _rounding_dot(_freeze(dimension_numbers), precision, jnp.dtype(accumulate))(lhs, rhs)

    return dot_general


def _freeze(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


def _einsum_subscripts(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> tuple[str, str, str]:
    """lhs, rhs and output subscripts of a dot_general (output: batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter(string.ascii_letters)
    lhs, rhs = [""] * lhs_ndim, [""] * rhs_ndim
    for i, j in zip(lb + lc, rb + rc):
        lhs[i] = rhs[j] = next(letters)
    lhs = [c or next(letters) for c in lhs]
    rhs = [c or next(letters) for c in rhs]
    out = ([lhs[i] for i in lb] + [c for i, c in enumerate(lhs) if i not in lb + lc]
           + [c for j, c in enumerate(rhs) if j not in rb + rc])
    return "".join(lhs), "".join(rhs), "".join(out)


@functools.lru_cache(maxsize=None)
def _rounding_dot(dimension_numbers, precision, accumulate):
    def forward(lhs, rhs):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=accumulate)

    @jax.custom_vjp
    def dot(lhs, rhs):
        return forward(lhs, rhs)

    def fwd(lhs, rhs):
        return forward(lhs, rhs), (lhs, rhs)

    def bwd(residuals, g):
        lhs, rhs = residuals
        g = g.astype(lhs.dtype)  # exact: the layer rounded its output to the compute dtype
        # Each gradient is a compute-dtype GEMM accumulated in float32, rounded once.
        if jax.default_backend() == "cpu":
            # XLA's CPU runtime lacks some BF16 x BF16 = F32 dots; products of half values
            # are exact in float32, so upcasting first gives the same numbers.
            g, lhs, rhs = (t.astype(accumulate) for t in (g, lhs, rhs))
        (lc, rc), (lb, rb) = dimension_numbers
        n = len(lc)
        if not lb and lc == tuple(range(lhs.ndim - n, lhs.ndim)) and rc == tuple(range(n)):
            # Dense layout (x's trailing axes against the kernel's leading ones): tensordots.
            n_out, n_batch = rhs.ndim - n, lhs.ndim - n
            d_lhs = jnp.tensordot(g, rhs, axes=(tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n, rhs.ndim))),
                                  precision=precision, preferred_element_type=accumulate)
            d_rhs = jnp.tensordot(lhs, g, axes=(tuple(range(n_batch)), tuple(range(n_batch))),
                                  precision=precision, preferred_element_type=accumulate)
        else:
            sl, sr, so = _einsum_subscripts(lhs.ndim, rhs.ndim, dimension_numbers)
            d_lhs = jnp.einsum(f"{so},{sr}->{sl}", g, rhs, precision=precision, preferred_element_type=accumulate)
            d_rhs = jnp.einsum(f"{so},{sl}->{sr}", g, lhs, precision=precision, preferred_element_type=accumulate)
        return d_lhs.astype(residuals[0].dtype), d_rhs.astype(residuals[1].dtype)

    dot.defvjp(fwd, bwd)
    return dot


def accumulating_conv(accumulate):
    """lax.conv_general_dilated that accumulates (and returns) ``accumulate``."""

    def conv(*args, preferred_element_type=None, **kw):
        return lax.conv_general_dilated(*args, preferred_element_type=accumulate, **kw)

    return conv


def softmax(x, axis=-1):
    """Softmax in float32 (or wider), whatever the input dtype."""
    return jax.nn.softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=axis)


def log_softmax(x, axis=-1):
    """log_softmax in float32 (or wider), whatever the input dtype."""
    return jax.nn.log_softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=axis)


def _dropout(weights, rate, rng, broadcast):
    shape = list(weights.shape)
    if broadcast:
        shape[:-2] = [1] * (len(shape) - 2)
    keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0).astype(weights.dtype)


def dot_product_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                          dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                          precision=None, module=None, *, compute, accumulate, **unused):
    """Attention with the op policy: both dot products in ``compute`` operands accumulated in
    ``accumulate``, scores scaled, biased, masked and soft-maxed in float32, each product
    rounded once.  Signature of flax's ``dot_product_attention`` ([..., len, heads, depth])."""
    del dtype, module, unused  # the policy decides the dtype; weights are not sown
    q, k, v = (x.astype(compute) for x in (query, key, value))
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=precision,
                        preferred_element_type=accumulate)
    scores = scores * jnp.asarray(q.shape[-1], accumulate) ** -0.5
    if bias is not None:
        scores = scores + bias.astype(accumulate)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(accumulate).min)
    weights = softmax(scores)
    if not deterministic and dropout_rate > 0.0:
        weights = _dropout(weights, dropout_rate, dropout_rng, broadcast_dropout)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(compute), v, precision=precision,
                     preferred_element_type=accumulate)
    return out.astype(compute)


# ----- torch's activation formulas (its CPU/CUDA kernels, in float32) -----------------------
def _erf(x):
    """torch's CPU float erf (ATen's vectorized kernel: Abramowitz-Stegun 7.1.26)."""
    f = jnp.float32
    a = jnp.abs(x)
    t = 1 / (f(0.3275911) * a + 1)
    r = (((f(1.061405429) * t + f(-1.453152027)) * t + f(1.421413741)) * t + f(-0.284496736)) * t + f(0.254829592)
    return jnp.sign(x) * ((-jnp.exp(-(x * x)) * t) * r + 1)


def _tanh(z):
    """tanh close to correctly rounded where ``1 + tanh`` cancels (Sleef's tanhf_u10 is; XLA's
    tanh is a few ulp off, which gelu-tanh's ``1 + tanh`` amplifies for negative inputs)."""
    a = jnp.abs(z)
    return jnp.where(a >= 0.5, jnp.sign(z) * (1 - 2 / (jnp.exp(2 * a) + 1)), jnp.tanh(z))


def _gelu(x, approximate=False):
    f = jnp.float32
    if approximate:  # torch: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        inner = f(math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5) * (x + f(0.044715) * (x * x * x))
        return f(0.5) * x * (1 + _tanh(inner))
    return x * f(0.5) * (1 + _erf(x * f(math.sqrt(0.5))))


def _softplus(x, beta=1.0, threshold=20.0):
    bx = x * jnp.float32(beta)
    return jnp.where(bx > threshold, x, jnp.log1p(jnp.exp(bx)) / jnp.float32(beta))


def _elu(x, alpha=1.0):
    return jnp.where(x > 0, x, jnp.expm1(x) * jnp.float32(alpha))


def _leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, x, x * jnp.float32(negative_slope))


def _hardswish(x):
    return x * jnp.clip(x + 3, 0, 6) / 6


_TORCH_ACTIVATIONS = {
    "gelu": _gelu,
    "silu": lambda x: x / (1 + jnp.exp(-x)),
    "swish": lambda x: x / (1 + jnp.exp(-x)),
    "sigmoid": lambda x: 1 / (1 + jnp.exp(-x)),
    "tanh": jnp.tanh,
    "softplus": _softplus,
    "elu": _elu,
    "leaky_relu": _leaky_relu,
    "mish": lambda x: x * jnp.tanh(jnp.log1p(jnp.exp(x))),
    "hard_silu": _hardswish,
    "hard_swish": _hardswish,
}


def torch_activation(name, jax_fn, x, args=(), kwargs=None):
    """Activation ``name`` of float32 ``x`` by torch's formula, the arguments of the JAX call
    ``jax_fn(x, *args, **kwargs)`` mapped onto it (gelu's ``approximate``, elu's ``alpha``,
    leaky_relu's ``negative_slope``); JAX's own function when torch has no counterpart."""
    formula = _TORCH_ACTIVATIONS.get(name)
    if formula is None:
        return jax_fn(x, *args, **(kwargs or {}))
    bound = inspect.signature(jax_fn).bind(x, *args, **(kwargs or {}))
    bound.apply_defaults()
    params = dict(list(bound.arguments.items())[1:])
    accepted = inspect.signature(formula).parameters
    return formula(x, **{k: v for k, v in params.items() if k in accepted})
