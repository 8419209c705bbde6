"""Block-scaled recipes on Flax nnx: `Precision.setup` gives each nnx.Linear the block-scaled
dot (`dualprec_jax.fp8.Fp8NnxDot`), whose state and numbers are the linen layer's
(`dualprec_jax.blockscale.BlockDotGeneral`): the same [seed, step] state, bit for bit, and
the same outputs and gradients within float32 summation bounds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dualprec import UnsupportedPolicyError
from dualprec_jax import Precision, fp8
from dualprec_jax import blockscale as jbs

RECIPES = ["rowwise", "rowwise_with_gw_hp", "mxfp8(rounding=floor,format=hybrid)",
           pytest.param("nvfp4(sr=true,rht=true,wblocks=16x16)", marks=pytest.mark.slow)]


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.fc1(x)


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="fc1")(x)


def _close(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("spec", RECIPES)
def test_nnx_block_layer_matches_linen(spec):
    policy = f"bf16-mixed,fp8={spec}"
    prec = Precision(policy)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 32)).astype(np.float32)
    x[2] *= np.float32(1e3)
    cs = [rng.standard_normal((32, 16)).astype(np.float32) for _ in range(3)]

    model = prec.setup(_Nnx(nnx.Rngs(0)))
    assert isinstance(model.fc1.dot_general, fp8.Fp8NnxDot)
    w, b = np.asarray(model.fc1.kernel[...]), np.asarray(model.fc1.bias[...])
    lin = _Linen()
    v = prec.init(lin, jax.random.PRNGKey(0), x)
    v = {**v, "params": {"fc1": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}}
    seed = jbs.layer_seed("fc1")
    assert fp8.state_tensors(model)["fp8.fc1.blockscale.state"].tolist() == [seed, 0]

    @nnx.jit
    def nnx_step(model, c):
        def f(model):
            y = model(x)
            return jnp.sum(y.astype(jnp.float32) * c), y
        return nnx.grad(f, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, fp8.Fp8Meta)), has_aux=True)(model)

    @jax.jit
    def linen_step(v, c):
        def f(v):
            y = prec.apply(lin, v, x)
            return jnp.sum(y.astype(jnp.float32) * c), y
        return jax.grad(f, has_aux=True)(v)

    for i, c in enumerate(cs):
        g_n, y_n = nnx_step(model, jnp.asarray(c))
        g_l, y_l = linen_step(v, jnp.asarray(c))
        assert y_n.dtype == jnp.bfloat16  # the layer's output (Precision.apply also casts to float32)
        _close(y_n, y_l)
        _close(g_n["fc1"]["kernel"][...], g_l["params"]["fc1"]["kernel"])
        _close(g_n["fc1"]["bias"][...], g_l["params"]["fc1"]["bias"])
        fp8.nnx_apply_fp8_grads(model, g_n)
        v = fp8.apply_fp8_grads(v, g_l)
        st_n, st_l = fp8.state_tensors(model), fp8.state_tensors(v)
        assert sorted(st_n) == sorted(st_l) == ["fp8.fc1.blockscale.state"]
        assert st_n["fp8.fc1.blockscale.state"].tolist() == st_l["fp8.fc1.blockscale.state"].tolist() == [seed, i + 1]
    # the nnx state loads a checkpoint's [seed, step] under the torch/linen name
    fp8.load_state_tensors(model, {"fp8.fc1.blockscale.state": np.array([123456789, 7])})
    assert fp8.state_tensors(model)["fp8.fc1.blockscale.state"].tolist() == [123456789, 7]


def test_nnx_block_layer_quantizes_the_raw_input():
    """Under bf16-mixed the nnx layer hands its dot bf16 copies; the block-scaled dot quantizes
    the float32 input and parameter as received (docs/fp8.md), as linen does: the output equals
    `block_linear_parts` on the float32 operands within float32 bounds, not on the bf16 copies."""
    prec = Precision("bf16-mixed,fp8=mxfp8(rounding=rceil)")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 32)).astype(np.float32)
    model = prec.setup(_Nnx(nnx.Rngs(1)))
    w, b = np.asarray(model.fc1.kernel[...]), np.asarray(model.fc1.bias[...])
    y = np.asarray(nnx.jit(lambda m: m(x))(model), np.float32)
    recipe = prec.policy.fp8
    raw = np.asarray(jbs.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w.T), None, recipe)["y"])
    want = np.asarray((jnp.asarray(raw).astype(jnp.bfloat16) + jnp.asarray(b).astype(jnp.bfloat16)), np.float32)
    copies = np.asarray(jbs.block_linear_parts_jit(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32),
                                                   jnp.asarray(w.T).astype(jnp.bfloat16).astype(jnp.float32),
                                                   None, recipe)["y"])
    assert not np.allclose(raw, copies, rtol=0, atol=1e-3)  # the two readings differ here
    np.testing.assert_allclose(y, want, rtol=2.0 ** -7, atol=1e-5 * float(np.max(np.abs(raw))))


@pytest.mark.parametrize("recipe", ["mxfp8", "delayed", "current"])
def test_nnx_fp8_refuses_several_contracting_axes(recipe):
    """Per-tensor recipes too: an nnx.LinearGeneral under FP8 used to run unquantized
    without a word."""
    prec = Precision(f"bf16-mixed,fp8={recipe}")

    class Gen(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.LinearGeneral((4, 8), 16, axis=(-2, -1), rngs=rngs)

        def __call__(self, x):
            return self.fc1(x)

    with pytest.raises(UnsupportedPolicyError, match=rf"fp8={recipe}: nnx FP8 layers take nnx.Linear .*fc1 is "
                                                     r"an nnx.LinearGeneral.*@fc1=\(fp8=none\)"):
        prec.setup(Gen(nnx.Rngs(0)))
    # kept out of the recipe by an override, it runs under the compute policy
    model = Precision(f"bf16-mixed,fp8={recipe},@fc1=(fp8=none)").setup(Gen(nnx.Rngs(0)))
    assert model(jnp.ones((2, 4, 8))).shape == (2, 16)


def test_nnx_refuses_a_forced_transformer_engine():
    """TE's Flax layers are linen: an nnx model under engine=transformer-engine is refused
    (it used to run the native layers without saying so)."""
    from dualprec import DeviceCaps

    b200 = DeviceCaps(platform="cuda", name="NVIDIA B200", compute_capability=(10, 0), backend="jax",
                      transformer_engine=True)
    for spec in ("mxfp8(engine=te)", "delayed(engine=te)"):
        with pytest.raises(UnsupportedPolicyError, match=r"engine=transformer-engine\): nnx models run the native"):
            Precision(f"bf16-mixed,fp8={spec}", caps=b200).setup(_Nnx(nnx.Rngs(0)))
