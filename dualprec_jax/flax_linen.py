"""Flax linen under a policy, without editing the model: a method interceptor
(`flax.linen.intercept_methods`) that gives each stock layer the op policy of its module path.

For the duration of one ``__call__`` the interceptor sets the layer's own knobs (``dtype``,
``param_dtype``, ``dot_general``, ``precision``, ``attention_fn``...) and restores them
afterwards, so parameters are created in the param dtype and every other interceptor in the
chain still runs.  A knob the user set (a custom ``dot_general``) is left alone.

It does what the jaxpr cannot show `dualprec_jax.autocast` (which `Precision.apply` and
`init` trace the model under): the dtype parameters are created in, torch's fused
``nn.Linear`` (the bias added to the float32 product before the one rounding), and which
module runs under which per-module override: while an autocast trace runs, a module whose
policy differs from the enclosing one is traced inside `autocast.policy_scope`, so the
table of its own policy is applied to every op it runs, hand-written ones included.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn

from dualprec import Policy

from .autocast import module_scope
from .casts import jax_dtype
from .ops import accumulating_conv, accumulating_dot_general, dot_product_attention, op_dtypes

__all__ = ["autocast", "module_path", "MATMUL_MODULES", "NORM_MODULES", "ATTENTION_MODULES", "PRELU_MODULES",
           "CELL_MODULES"]

MATMUL_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
NORM_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm)
ATTENTION_MODULES = (nn.MultiHeadDotProductAttention,)
# On the lower list too (torch's prelu and RNN cells): inputs, carries and outputs in the
# compute dtype, as CUDA autocast casts them; the cells' own Dense layers are intercepted.
PRELU_MODULES = (nn.PReLU,)
CELL_MODULES = (nn.RNNCellBase,)


def module_path(module: nn.Module) -> str:
    """The dotted path ``policy.for_module`` matches ("block.attn.query"); "" for the root."""
    return ".".join(str(p) for p in module.path)


@contextlib.contextmanager
def _knobs(module, changes: dict):
    """Set dataclass fields of a bound (frozen) module for one call, then restore them."""
    changes = {k: v for k, v in changes.items() if hasattr(module, k)}
    saved = {k: getattr(module, k) for k in changes}
    for k, v in changes.items():
        object.__setattr__(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            object.__setattr__(module, k, v)


def _matmul_knobs(module, d) -> dict:
    knobs = {"dtype": d.compute, "param_dtype": d.param}
    if getattr(module, "precision", None) is None and d.precision is not None:
        knobs["precision"] = d.precision
    if isinstance(module, nn.Einsum):
        knobs["preferred_element_type"] = d.accumulate
    elif isinstance(module, nn.Conv):
        if module.conv_general_dilated is None and module.conv_general_dilated_cls is None:
            knobs["conv_general_dilated"] = accumulating_conv(d.accumulate)
    elif module.dot_general is None and module.dot_general_cls is None:
        knobs["dot_general"] = accumulating_dot_general(d.accumulate)
    return knobs


def _to(dtype, tree):
    """Floating leaves of ``tree`` in ``dtype`` (carries are tuples of arrays)."""
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _intercept(policy: Policy, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    path = module_path(module)
    own = policy.for_module(path)
    if path and own != policy.for_module(path.rpartition(".")[0]):
        # where an override starts: floating inputs in its compute dtype, outputs in its
        # output dtype (dualprec_torch.modules does the same around the module's forward)
        d = op_dtypes(own)
        args, kwargs = _to(d.compute, (args, kwargs))
        with module_scope(policy, own):
            out = _intercept_call(own, module, next_fun, args, kwargs)
        return _to(jax_dtype(own.output_dtype), out)
    with module_scope(policy, own):
        return _intercept_call(own, module, next_fun, args, kwargs)


def _intercept_call(own: Policy, module, next_fun, args, kwargs):
    d = op_dtypes(own)
    if isinstance(module, MATMUL_MODULES):
        with _knobs(module, _matmul_knobs(module, d)):
            # The layer adds its bias to the float32 product; this is the one rounding.
            return next_fun(*args, **kwargs).astype(d.compute)
    if isinstance(module, NORM_MODULES):
        with _knobs(module, {"dtype": d.norm, "param_dtype": d.param}):
            x, *rest = args
            return next_fun(x.astype(d.norm), *rest, **kwargs).astype(d.norm_output)
    if isinstance(module, ATTENTION_MODULES):
        knobs = {"dtype": d.compute, "param_dtype": d.param}
        if module.precision is None and d.precision is not None:
            knobs["precision"] = d.precision
        if module.attention_fn is nn.dot_product_attention:
            knobs["attention_fn"] = functools.partial(dot_product_attention, compute=d.compute,
                                                      accumulate=d.accumulate)
        with _knobs(module, knobs):
            return next_fun(*args, **kwargs)
    if isinstance(module, PRELU_MODULES):
        with _knobs(module, {"param_dtype": d.param}):
            x, *rest = args
            return next_fun(x.astype(d.compute), *rest, **kwargs).astype(d.compute)
    if isinstance(module, CELL_MODULES) and len(args) == 2:
        # carry and input in the compute dtype, as CUDA autocast casts an RNN cell's; the new
        # carry goes back in the dtype the carry came in (a scan carry keeps one dtype: start
        # from a compute-dtype carry to carry it in that dtype, the values are the same)
        carry, x = args
        with _knobs(module, {"dtype": d.compute, "param_dtype": d.param}):
            new, y = next_fun(_to(d.compute, carry), _to(d.compute, x), **kwargs)
        import jax

        new = jax.tree_util.tree_map(lambda n, c: n.astype(c.dtype) if hasattr(c, "dtype") else n, new, carry)
        return new, _to(d.compute, y)
    # Any other module (Embed, user modules): create its parameters in the param dtype.
    with _knobs(module, {"param_dtype": d.param}):
        return next_fun(*args, **kwargs)


def autocast(policy: Policy):
    """Context manager: every linen module called inside follows ``policy``."""
    return nn.intercept_methods(functools.partial(_intercept, policy))
