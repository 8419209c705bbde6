"""Flax nnx under a policy, without editing the model: `setup(model, policy)` walks the
module graph once, casts parameters to the param dtype of their module path, sets each stock
layer's own knobs (dtype, preferred_element_type, precision, attention_fn) and gives matmul
and norm layers a policy subclass whose ``__call__`` rounds the result once.

The subclass (``PolicyLinear`` for ``nnx.Linear`` ...) keeps the parameter names and the
graph structure, so nnx.split/merge/state, checkpoints and optimizers see the same tree.
"""

from __future__ import annotations

import functools


import jax
from flax import nnx
from jax import lax

from dualprec import Policy

from .casts import cast_floating
from .ops import accumulating_dot_general, dot_product_attention, op_dtypes

__all__ = ["setup", "MATMUL_MODULES", "NORM_MODULES", "ATTENTION_MODULES"]

MATMUL_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
NORM_MODULES = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm)
ATTENTION_MODULES = (nnx.MultiHeadAttention,)


class _RoundsOutput:
    """Mixin: the layer's float32 result (bias included) rounded once to ``_dualprec_out``."""


    def __call__(self, x, *args, **kwargs):
        x = x.astype(self.dtype)  # norms take float32 inputs; matmuls their compute dtype
        return super().__call__(x, *args, **kwargs).astype(self._dualprec_out)


@functools.lru_cache(maxsize=None)
def _policy_class(cls: type) -> type:
    return type(f"Policy{cls.__name__}", (_RoundsOutput, cls), {"__module__": __name__})


def _path(keys) -> str:
    return ".".join(str(k) for k in keys)


def _configure(module, policy: Policy):
    """Set the layer's knobs; return the policy-class copy that replaces it, or None."""
    d = op_dtypes(policy)
    if isinstance(module, MATMUL_MODULES):
        module.dtype, module.param_dtype = d.compute, d.param
        module.preferred_element_type = d.accumulate
        if getattr(module, "dot_general", None) in (None, lax.dot_general) and \
                getattr(module, "dot_general_cls", None) is None:
            module.dot_general = accumulating_dot_general(d.accumulate)
        if module.precision is None:
            module.precision = d.precision
        module._dualprec_out = d.compute
    elif isinstance(module, NORM_MODULES):
        module.dtype, module.param_dtype = d.norm, d.param
        module._dualprec_out = d.norm_output
    elif isinstance(module, ATTENTION_MODULES):
        module.dtype, module.param_dtype = d.compute, d.param
        if module.precision is None:
            module.precision = d.precision
        module.attention_fn = functools.partial(dot_product_attention, compute=d.compute,
                                                accumulate=d.accumulate)
        return None
    else:
        return None
    if isinstance(module, _RoundsOutput):
        return None
    # Python refuses __class__ assignment across nnx's managed-dict layout; copy instead.
    twin = object.__new__(_policy_class(type(module)))
    twin.__dict__.update(module.__dict__)
    return twin


def setup(model: nnx.Module, policy: Policy) -> nnx.Module:
    """Put ``model`` (in place) under ``policy`` and return it."""
    replaced = []
    for keys, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            twin = _configure(node, policy.for_module(_path(keys)))
            if twin is not None:
                if not keys:
                    raise TypeError("setup() takes a model that contains layers, not a single "
                                    f"{type(node).__name__}; wrap it in an nnx.Module")
                replaced.append((keys, twin))
        elif isinstance(node, nnx.Param):
            owner = _path(keys[:-1])
            dtype = op_dtypes(policy.for_module(owner)).param
            node.set_value(cast_floating(node.get_value(), dtype, what=f"param {_path(keys)}"))
    for keys, twin in replaced:
        parent = model
        for k in keys[:-1]:
            parent = parent[k] if isinstance(k, int) or not hasattr(parent, str(k)) else getattr(parent, str(k))
        if isinstance(keys[-1], int) or not hasattr(parent, str(keys[-1])):
            parent[keys[-1]] = twin
        else:
            setattr(parent, str(keys[-1]), twin)
    return model




def call(model: nnx.Module, args, kwargs, transform):
    """``model(*args, **kwargs)`` through ``transform`` (a function transformation such as
    `dualprec_jax.autocast`), the model's state passed in as arrays and the state the call
    wrote (BatchNorm statistics, RNG counts, caches) written back into ``model``, each
    variable in the dtype it had."""
    graphdef, state = nnx.split(model)

    def run(state, args, kwargs):
        m = nnx.merge(graphdef, state)
        return m(*args, **kwargs), nnx.state(m)

    out, new_state = transform(run)(state, args, kwargs)
    new_state = jax.tree_util.tree_map(
        lambda new, old: new.astype(old.dtype) if hasattr(new, "astype") and new.dtype != old.dtype else new,
        new_state, state)
    nnx.update(model, new_state)
    return out
