"""Pytree casts of the JAX backend: policy dtype names to JAX dtypes, and jmp-style casts
that touch floating leaves only (integer, bool and complex leaves pass through)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dualprec.dtypes import FLOAT_DTYPES

__all__ = ["jax_dtype", "cast_floating", "accumulation_dtype"]

# Mapped from the one dtype table (dualprec.dtypes): jax.numpy names its dtypes by the
# canonical names.  Policy dtypes only, as before.
_DTYPES = {name: getattr(jnp, name) for name in FLOAT_DTYPES}


def jax_dtype(name: str) -> jnp.dtype:
    """The JAX dtype of a canonical policy dtype name; fails rather than give float32 for
    float64 when jax_enable_x64 is off (JAX would silently truncate)."""
    dtype = jnp.dtype(_DTYPES[name])
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError("this policy computes in float64, but jax_enable_x64 is off, so JAX would "
                           "silently use float32; build the Precision with enable_x64=True (the default) "
                           "or call jax.config.update('jax_enable_x64', True) first")
    return dtype


def accumulation_dtype(compute: str) -> jnp.dtype:
    """Matmuls accumulate, and normalisations, softmax and losses run, in float32 (float64
    under a float64 policy)."""
    return jax_dtype("float64" if compute == "float64" else "float32")


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _cast_leaf(x: Any, dtype, path, what: str):
    if _is_array(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return jnp.asarray(x).astype(dtype)
    # Python scalars are weakly typed (they follow the arrays they meet), and any other leaf
    # (a string, an object) passes through untouched, as jmp's casts pass it
    return x


def cast_floating(tree: Any, dtype, what: str = "cast") -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype``; leave other leaves alone."""
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map_with_path(lambda p, x: _cast_leaf(x, dtype, p, what), tree)
