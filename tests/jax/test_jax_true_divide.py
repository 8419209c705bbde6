"""Divisions in the JAX codecs are IEEE divisions, as NumPy's (the reference) and torch's.

XLA may compile ``a / b`` with ``b`` a broadcast or a constant as ``a * (1/b)`` (two roundings);
on XLA:CPU it does.  A block scale computed that way lands on the other side of an E4M3 rounding
tie: NVFP4 block amax 3.65625 in a tensor of amax 9.75 gives ``(3.65625/6)/(9.75/2688) = 168``
exactly, a tie between the E4M3 values 160 and 176 (to even: 160); the reciprocal product is
168.00002 and rounds to 176, and every code of that block changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualprec_jax.blockscale as jbs
from dualprec.ref import blockscale as ref
from dualprec_jax.ops import true_divide


@pytest.mark.parametrize("shape_b", ["scalar", "row", "constant"])
def test_true_divide_is_the_ieee_division_under_jit(shape_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 16)).astype(np.float32)
    if shape_b == "scalar":
        b = np.float32(0.0036272320430725813)
        got = jax.jit(true_divide)(a, b)
    elif shape_b == "row":
        b = rng.standard_normal((512, 1)).astype(np.float32)
        got = jax.jit(true_divide)(a, b)
    else:
        b = np.float32(6.0)
        got = jax.jit(lambda a: true_divide(a, jnp.float32(6.0)))(a)
    np.testing.assert_array_equal(np.asarray(got), a / b)


def test_true_divide_differentiates_as_division():
    a = jnp.linspace(0.5, 3.0, 12, dtype=jnp.float32).reshape(3, 4)
    s = jnp.float32(3.0)
    g_ours = jax.grad(lambda a, s: true_divide(a, s).sum(), argnums=(0, 1))(a, s)
    g_plain = jax.grad(lambda a, s: (a / s).sum(), argnums=(0, 1))(a, s)
    np.testing.assert_allclose(np.asarray(g_ours[0]), np.asarray(g_plain[0]), rtol=1e-7)
    np.testing.assert_allclose(np.asarray(g_ours[1]), np.asarray(g_plain[1]), rtol=1e-6)


def _tie_tensor():
    x = np.zeros((2, 32), np.float32)
    x[0, 0] = 9.75  # the tensor amax: ts = 9.75 / 2688
    x[1, 16:32] = np.linspace(-3.65625, 3.65625, 16, dtype=np.float32)  # block amax 3.65625
    return x


def test_nvfp4_block_scale_on_an_e4m3_tie_matches_the_reference():
    x = _tie_tensor()
    ts = ref._training_tensor_scale(x)
    want_s, want_c = ref.nvfp4_quantize(x, ts)
    assert np.float32(want_s.astype(np.float32)[1, 1]) == 160.0  # the tie, to even
    for fn in (jbs.nvfp4_quantize, jax.jit(jbs.nvfp4_quantize)):
        s, c = fn(jnp.asarray(x), jbs._training_tensor_scale(jnp.asarray(x)))
        np.testing.assert_array_equal(np.asarray(s).astype(np.float32), want_s.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(c), want_c)
