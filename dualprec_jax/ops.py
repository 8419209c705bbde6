"""The op policy of DESIGN.md as JAX functions, shared by the linen and nnx interceptors.

Matmul-like ops take compute-dtype operands, accumulate in float32 (``preferred_element_type``)
and are rounded to the compute dtype once, after the bias is added in float32: the numbers
torch autocast gives on CPU.  Normalisations and softmax run in float32 (float64 under a
float64 policy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from dualprec import Policy

from .casts import accumulation_dtype, jax_dtype, wider_than_f32

__all__ = ["OpDtypes", "op_dtypes", "accumulating_dot_general", "accumulating_conv",
           "dot_product_attention", "softmax", "log_softmax"]


class OpDtypes:
    """The JAX dtypes one module uses under a policy (resolved once per policy)."""

    def __init__(self, policy: Policy):
        self.param = jax_dtype(policy.param_dtype)
        self.compute = jax_dtype(policy.compute_dtype)
        self.output = jax_dtype(policy.output_dtype)
        self.accumulate = accumulation_dtype(policy.compute_dtype)
        self.norm = wider_than_f32(policy.compute_dtype)
        # Mixed policies follow autocast's fp32 list (norm outputs stay float32, the next
        # matmul casts); pure ones round the norm output to the compute dtype, as a torch
        # module converted with .to(dtype) does.
        self.norm_output = self.norm if policy.is_mixed else self.compute
        # float32 compute means float32 matmuls: no TF32 on GPUs (torch's default too).
        self.precision = lax.Precision.HIGHEST if self.compute in (jnp.float32, jnp.float64) else None


@functools.lru_cache(maxsize=None)
def op_dtypes(policy: Policy) -> OpDtypes:
    return OpDtypes(policy)


def accumulating_dot_general(accumulate):
    """lax.dot_general that accumulates (and returns) ``accumulate``."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=accumulate, **kw)

    return dot_general


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
