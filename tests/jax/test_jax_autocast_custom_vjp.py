"""A user's custom_vjp that closes over an array constant, under autocast and differentiated.

JAX hoists such a constant into the first ``num_consts`` inputs of the ``custom_vjp_call``
equation; autocast's rewrite must not differentiate those inputs (JAX raises
CustomVJPException when it is asked to).  The block-scaled NVFP4 layers hit this through their
code-book lookups before the rewrite kept the constants out of the derivative."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import dualprec_jax

TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


@jax.custom_vjp
def lookup_scale(x):
    return x * jnp.asarray(TABLE)[jnp.clip(x.astype(jnp.int32), 0, 7)]


def _fwd(x):
    return lookup_scale(x), x


def _bwd(x, g):
    return (g * jnp.asarray(TABLE)[3],)  # 1.5: the user's rule, not the derivative of the primal


lookup_scale.defvjp(_fwd, _bwd)


def test_custom_vjp_with_closed_over_constant_differentiates_under_autocast():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)

    def loss(w, x):
        return lookup_scale(x @ w).astype(jnp.float32).sum()

    got = jax.grad(dualprec_jax.autocast(loss, "bf16-mixed"))(w, x)

    def by_hand(w, x):  # the matmul on the lower list: bf16 operands, bf16 result
        return lookup_scale(x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32).sum()

    want = jax.grad(by_hand)(w, x)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.any(np.asarray(got) != 0)


def test_nvfp4_layer_trains_under_the_one_path_autocast():
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(nn.gelu(nn.Dense(32)(x)))

    prec = dualprec_jax.Precision("bf16-mixed,fp8=nvfp4")
    model, x = M(), jnp.asarray(np.random.default_rng(1).standard_normal((4, 32)), jnp.float32)
    variables = prec.init(model, jax.random.PRNGKey(0), x)
    grads = jax.grad(lambda p: prec.apply(model, {**variables, "params": p}, x).sum())(variables["params"])
    g = np.asarray(grads["Dense_0"]["kernel"])
    assert g.dtype == np.float32 and np.all(np.isfinite(g)) and np.any(g != 0)
