"""Jitted functions for the no-leak test (tests/jax/test_jax_no_leaks.py): each is run plain
in a process that never imports dualprec, and plain again in one that ran them under
autocast first; the results must be the same bits and dtypes.  Importable without dualprec."""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.numpy import vdot  # imported by name before any use

_dense = nn.Dense(8)
_DENSE_VARS = _dense.init(jax.random.key(0), jnp.ones((4, 16)))


def _scan_matmul(c, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), c, None, length=2)[0]


FUNCTIONS = {
    "softmax": jax.jit(lambda x, w: jax.nn.softmax(x)),
    "log_softmax": jax.jit(lambda x, w: jax.nn.log_softmax(x)),
    "logsumexp": jax.jit(lambda x, w: jax.nn.logsumexp(x, axis=-1)),
    "gelu": jax.jit(lambda x, w: jax.nn.gelu(x)),
    "silu": jax.jit(lambda x, w: jax.nn.silu(x)),
    "sum": jax.jit(lambda x, w: jnp.sum(x, axis=-1)),
    "mean": jax.jit(lambda x, w: jnp.mean(x, axis=-1)),
    "norm": jax.jit(lambda x, w: jnp.linalg.norm(x, axis=-1)),
    "exp": jax.jit(lambda x, w: jnp.exp(x)),
    "matmul": jax.jit(lambda x, w: x @ w),
    "vdot": jax.jit(lambda x, w: vdot(x[0], w[:, 0])),
    "tensordot": jax.jit(lambda x, w: jnp.tensordot(x, w, axes=1)),
    "l2_loss": jax.jit(lambda x, w: optax.l2_loss(x, jnp.zeros_like(x))),
    "bce": jax.jit(lambda x, w: optax.sigmoid_binary_cross_entropy(x, jnp.ones_like(x))),
    "xent": jax.jit(lambda x, w: optax.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(x.shape[0], jnp.int32))),
    "dense": jax.jit(lambda x, w: _dense.apply(_DENSE_VARS, x)),
    "layer_norm": jax.jit(lambda x, w: nn.LayerNorm().apply({"params": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}}, x)),
    "scan": jax.jit(lambda x, w: _scan_matmul(x[:, :16], w[:, :16] if w.shape[1] >= 16 else jnp.ones((16, 16), x.dtype))),
    "checkpoint": jax.jit(jax.checkpoint(lambda x, w: jnp.exp(x) @ w)),
}
DTYPES = ("float32", "bfloat16", "float16")


def inputs(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16)).astype(np.float32)).astype(dtype)
    w = jnp.asarray(rng.standard_normal((16, 16)).astype(np.float32)).astype(dtype)
    return x, w


def bits(a):
    """The raw bit patterns of a float array (npz cannot hold bfloat16)."""
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]) if a.dtype.kind in "fV" else a


def run_all() -> dict:
    """{name/dtype: output as numpy} of every function, called plainly."""
    out = {}
    for dtype in DTYPES:
        x, w = inputs(dtype)
        for name, f in FUNCTIONS.items():
            out[f"{name}/{dtype}"] = np.asarray(f(x, w))
    return out


if __name__ == "__main__":  # the clean process: python -m tests.jax.leak_functions OUT.npz
    assert not any(m.startswith("dualprec") for m in sys.modules), "the clean process imported dualprec"
    results = run_all()
    assert not any(m.startswith("dualprec") for m in sys.modules), "the clean process imported dualprec"
    np.savez(sys.argv[1], **{k.replace("/", "__"): bits(v) for k, v in results.items()},
             **{"dtype__" + k.replace("/", "__"): np.asarray(str(v.dtype)) for k, v in results.items()})
