"""Sharded training in JAX: parameters placed on a device mesh with `NamedSharding`, in the
policy's param dtype, and gradients reduced in its reduce dtype.

Two ways, both with JAX's own machinery (nothing home-made underneath):

* sharded ``jit`` (GSPMD): place the parameters with `shard_params` (rules of path pattern
  -> PartitionSpec, or `fsdp_rules` for FSDP-style sharding of every large parameter) and
  the batch with a NamedSharding; ``jax.grad`` inside ``jit`` reduces the gradients across
  the data axis by itself, in the gradient's dtype (the param dtype).  The loss-scale
  decision is taken on global arrays, so it is one decision for all shards.  A reduce dtype
  other than the param dtype cannot be imposed on XLA's implicit reduction:
  `check_jit_reduce` refuses it and names the shard_map route.
* ``shard_map``: each device computes its local gradients; `reduce_gradients` casts them to
  the reduce dtype of their parameter's policy, averages them over the data axis and casts
  back.  After that every device holds the same gradients, so the loss-scaled optimizer
  takes the same decision everywhere.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dualprec import Policy
from dualprec.errors import PolicyError, UnsupportedPolicyError, did_you_mean

from .casts import jax_dtype

__all__ = ["leaf_paths", "shard_params", "fsdp_rules", "reduce_gradients", "check_jit_reduce",
           "REDUCE_DTYPES"]

#: Dtypes a JAX collective reduces (float64 needs jax_enable_x64).
REDUCE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def leaf_paths(tree) -> list[str]:
    """Dotted paths of the leaves ("dense_0.kernel"), in tree order."""
    return [".".join(_key(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    size = 1
    for n in names:
        if n not in mesh.shape:
            raise PolicyError(f"PartitionSpec axis {n!r} is not an axis of the mesh {dict(mesh.shape)}")
        size *= mesh.shape[n]
    return size


def _check_divides(path: str, shape: tuple, spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise PolicyError(f"{path}: PartitionSpec {spec} has {len(spec)} entries but the parameter has "
                          f"{len(shape)} dimensions {shape}")
    for dim, axis in enumerate(spec):
        if axis is None:
            continue
        size = _axis_size(mesh, axis)
        if shape[dim] % size:
            raise PolicyError(f"{path}: dimension {dim} of shape {shape} ({shape[dim]}) is not divisible by "
                              f"mesh axis {axis!r} of size {size}; replicate it (PartitionSpec()), shard "
                              "another dimension, or pad the layer to a multiple of the axis size")


def shard_params(params, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]] = (), *,
                 policy: Any = None, default: PartitionSpec = PartitionSpec()):
    """``params`` placed on ``mesh``: the first rule whose fnmatch pattern matches a leaf's
    dotted path gives its PartitionSpec (``default``, replicated, otherwise).  With a
    ``policy`` the leaves are cast to the param dtype of their module's policy first.  A rule
    that matches no leaf, or a spec that does not divide a dimension, is an error."""
    policy = None if policy is None else Policy.parse(policy)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [".".join(_key(k) for k in path) for path, _ in flat]
    used = set()
    out = []
    for path, (_, leaf) in zip(paths, flat):
        spec = default
        for i, (pattern, rule_spec) in enumerate(rules):
            if fnmatch.fnmatchcase(path, pattern):
                spec, _ = rule_spec, used.add(i)
                break
        _check_divides(path, tuple(jnp.shape(leaf)), spec, mesh)
        if policy is not None and jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            owner = path.rsplit(".", 1)[0] if "." in path else ""
            leaf = jnp.asarray(leaf, jax_dtype(policy.for_module(owner).param_dtype))
        out.append(jax.device_put(leaf, NamedSharding(mesh, spec)))
    unused = [pattern for i, (pattern, _) in enumerate(rules) if i not in used]
    if unused:
        raise PolicyError(f"shard_params: rule {unused[0]!r} matches no parameter"
                          f"{did_you_mean(unused[0], paths)}; the paths are dotted, e.g. {paths[0]!r}")
    return jax.tree_util.tree_unflatten(treedef, out)


def fsdp_rules(params, mesh: Mesh, axis: str, *, min_size: int = 1024) -> list[tuple[str, PartitionSpec]]:
    """FSDP-style rules: each parameter with at least ``min_size`` elements is sharded along
    ``axis`` on its largest dimension that the axis divides; the rest stay replicated."""
    size = _axis_size(mesh, axis)
    rules = []
    for path, leaf in zip(leaf_paths(params), jax.tree_util.tree_leaves(params)):
        shape = tuple(jnp.shape(leaf))
        if not shape or int(jnp.size(leaf)) < min_size:
            continue
        dims = sorted((d for d in range(len(shape)) if shape[d] % size == 0), key=lambda d: -shape[d])
        if dims:
            spec = [None] * len(shape)
            spec[dims[0]] = axis
            rules.append((path, PartitionSpec(*spec)))
    return rules


def _check_reduce(policy: Policy) -> None:
    for path, p in policy.policies():
        if p.reduce_dtype not in REDUCE_DTYPES:
            where = f" (override @{path})" if path else ""
            raise PolicyError(f'"{policy}"{where}: reduce={p.reduce_dtype} cannot be all-reduced; use one of '
                              f"{', '.join(REDUCE_DTYPES)}")


def check_jit_reduce(policy: Any) -> None:
    """Refuse what sharded ``jit`` cannot do: XLA reduces gradients in their own dtype (the
    param dtype), so a different reduce dtype would silently not be applied."""
    policy = Policy.parse(policy)
    _check_reduce(policy)
    for path, p in policy.policies():
        if p.reduce_dtype != p.param_dtype:
            where = f" (override @{path})" if path else ""
            raise UnsupportedPolicyError(
                f'"{policy}"{where}: reduce={p.reduce_dtype} with params={p.param_dtype} under sharded jit: '
                "XLA reduces gradients in the param dtype there; compute the gradients in shard_map and "
                "reduce them with dualprec_jax.sharding.reduce_gradients(grads, axis_name, policy)")


def reduce_gradients(grads, axis_name: str | Iterable[str], policy: Any, *, mean: bool = True):
    """Inside ``shard_map``: every floating gradient cast to the reduce dtype of its
    parameter's policy, averaged (``mean``) or summed over ``axis_name``, cast back to its
    own dtype.  Non-floating leaves pass through."""
    policy = Policy.parse(policy)
    _check_reduce(policy)
    reduce = jax.lax.pmean if mean else jax.lax.psum
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    out = []
    for path, g in flat:
        if not jnp.issubdtype(g.dtype, jnp.floating):
            out.append(g)
            continue
        dotted = ".".join(_key(k) for k in path)
        owner = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        wire = jax_dtype(policy.for_module(owner).reduce_dtype)
        out.append(reduce(g.astype(wire), axis_name).astype(g.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
