"""Flax nnx under a policy, without editing the model: `setup(model, policy)` walks the
module graph once, casts parameters to the param dtype of their module path, sets each stock
layer's own knobs (dtype, preferred_element_type, precision, attention_fn) and gives matmul
and norm layers a policy subclass whose ``__call__`` rounds the result once.

The subclass (``PolicyLinear`` for ``nnx.Linear`` ...) keeps the parameter names and the
graph structure, so nnx.split/merge/state, checkpoints and optimizers see the same tree.
"""

from __future__ import annotations

import contextlib
import functools

import jax
from flax import nnx
from jax import lax

from dualprec import Policy

from .casts import cast_floating
from .ops import accumulating_dot_general, dot_product_attention, op_dtypes

__all__ = ["setup", "call", "MATMUL_MODULES", "NORM_MODULES", "ATTENTION_MODULES", "PRELU_MODULES",
           "CELL_MODULES"]

MATMUL_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
NORM_MODULES = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm)
ATTENTION_MODULES = (nnx.MultiHeadAttention,)
PRELU_MODULES = (nnx.PReLU,)  # lower list (torch's prelu): input and output in the compute dtype
CELL_MODULES = (nnx.RNNCellBase,)  # lower list (torch's RNN cells)


class _RoundsOutput:
    """Mixin: the layer's float32 result (bias included) rounded once to ``_dualprec_out``;
    inside an autocast trace, its ops scoped to its own policy when that is an override."""

    def __call__(self, x, *args, **kwargs):
        from . import fp8
        from .autocast import module_scope

        top, own = self._dualprec_policies
        raw = fp8.Fp8NnxLinear is not None and isinstance(self, fp8.Fp8NnxLinear)
        if raw:  # an FP8 dot quantizes the input as received (docs/fp8.md), not this cast
            fp8._NNX_RAW_INPUT.append(x)
        try:
            with module_scope(top, own):
                x = x.astype(self.dtype)  # norms take float32 inputs; matmuls their compute dtype
                return super().__call__(x, *args, **kwargs).astype(self._dualprec_out)
        finally:
            if raw:
                fp8._NNX_RAW_INPUT.pop()


class _CellInCompute:
    """Mixin for RNN cells: carry and input in the compute dtype (CUDA autocast casts an RNN
    cell's), the output too; the new carry in the dtype the carry came in (a scan carry keeps
    one dtype; start from a compute-dtype carry to carry it in that dtype)."""

    def __call__(self, carry, inputs, *args, **kwargs):
        from .autocast import module_scope

        top, own = self._dualprec_policies
        cast = functools.partial(_floats_to, self.dtype)
        with module_scope(top, own):
            new, y = super().__call__(cast(carry), cast(inputs), *args, **kwargs)
        new = jax.tree_util.tree_map(lambda n, c: n.astype(c.dtype) if hasattr(c, "dtype") else n, new, carry)
        return new, cast(y)


def _floats_to(dtype, tree):
    import jax.numpy as jnp

    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@functools.lru_cache(maxsize=None)
def _policy_class(cls: type) -> type:
    mixin = _CellInCompute if issubclass(cls, CELL_MODULES) else _RoundsOutput
    return type(f"Policy{cls.__name__}", (mixin, cls), {"__module__": __name__})


class _UnderTable:
    """Marks the class `_table_class` made (``__call__`` under the whole op table)."""

    __slots__ = ()


@functools.lru_cache(maxsize=None)
def _table_class(cls: type) -> type:
    """A subclass of ``cls`` (same name, same layout, so ``__class__`` can be assigned) whose
    ``__call__`` runs ``cls.__call__`` under the whole op table (`dualprec_jax.autocast`),
    the state the call writes put back into the model."""

    def __call__(self, *args, **kwargs):
        from .autocast import autocast, tracing_policy

        policy = self._dualprec_policy
        plain = super(table, self).__call__
        if tracing_policy() is not None or not policy.uses_mixed:
            return plain(*args, **kwargs)
        return call(self, args, kwargs, lambda f: autocast(f, policy, context=contextlib.nullcontext))

    table = type(cls.__name__, (cls, _UnderTable), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                    "__call__": __call__})
    return table


def _path(keys) -> str:
    return ".".join(str(k) for k in keys)


def _configure(module, policy: Policy, top: Policy):
    """Set the layer's knobs; return the policy-class copy that replaces it, or None."""
    d = op_dtypes(policy)
    module._dualprec_policies = (top, policy)
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
    elif isinstance(module, PRELU_MODULES):
        module.dtype, module.param_dtype = d.compute, d.param
        module._dualprec_out = d.compute
    elif isinstance(module, CELL_MODULES):
        module.dtype, module.param_dtype = d.compute, d.param
    elif isinstance(module, ATTENTION_MODULES):
        module.dtype, module.param_dtype = d.compute, d.param
        if module.precision is None:
            module.precision = d.precision
        module.attention_fn = functools.partial(dot_product_attention, compute=d.compute,
                                                accumulate=d.accumulate)
        return None
    else:
        return None
    if isinstance(module, (_RoundsOutput, _CellInCompute)):
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
            twin = _configure(node, policy.for_module(_path(keys)), policy)
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
    _run_under_table(model, policy)
    return model


def _run_under_table(model: nnx.Module, policy: Policy) -> None:
    """Calls of ``model`` from now on run under the op table: its class becomes a subclass
    (same name, same layout) whose ``__call__`` traces the original under `autocast`."""
    model._dualprec_policy = policy
    if isinstance(model, _UnderTable) or not callable(getattr(type(model), "__call__", None)):
        return
    model.__class__ = _table_class(type(model))




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
    old_leaves = jax.tree_util.tree_leaves(state)
    new_leaves, treedef = jax.tree_util.tree_flatten(new_state)
    changed = [new is not old for new, old in zip(new_leaves, old_leaves)]
    if any(changed):  # only what the call wrote: the rest may belong to an enclosing trace
        written = [new.astype(old.dtype) if hasattr(new, "astype") and new.dtype != old.dtype else new
                   for new, old in zip(new_leaves, old_leaves)]
        flat = [(path, var) for (path, var), c in zip(nnx.to_flat_state(jax.tree_util.tree_unflatten(treedef, written)),
                                                       changed) if c]
        nnx.update(model, nnx.from_flat_state(flat))
    return out
