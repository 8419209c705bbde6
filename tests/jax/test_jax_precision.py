"""Precision's casts, jmp export, device checks, unsupported presets, overrides by module
path, parameter init dtype, and jit/grad/vmap over the linen interceptor."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from dualprec import DeviceCaps, PolicyError, presets
from dualprec_jax import Precision, device_caps
from tests.jax.conftest import MLP, D

IN_SCOPE = ["32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "bfloat16", "float16",
            "mixed_bfloat16", "mixed_float16"]


def test_casts_touch_floating_leaves_only():
    prec = Precision("bf16-mixed")
    tree = {"f": jnp.ones(2), "i": jnp.arange(2), "b": jnp.array([True]), "c": jnp.ones(2, jnp.complex64),
            "np": np.ones(2, np.float32), "py": 1.5, "none": None}
    out = prec.cast_to_compute(tree)
    assert out["f"].dtype == out["np"].dtype == jnp.bfloat16
    assert out["i"].dtype == tree["i"].dtype and out["b"].dtype == bool and out["c"].dtype == jnp.complex64
    assert out["py"] == 1.5 and out["none"] is None
    assert prec.cast_to_param(out)["f"].dtype == jnp.float32
    assert prec.convert_output(out)["f"].dtype == prec.cast_to_output(out)["f"].dtype == jnp.float32
    spec = prec.convert_input(jax.ShapeDtypeStruct((3,), jnp.float32))
    assert spec.dtype == jnp.bfloat16


def test_casts_pass_non_array_leaves_through_as_jmp():
    o = object()
    out = Precision("bf16-mixed").cast_to_compute({"x": [jnp.ones(1), "text"], "o": o})
    assert out["x"][0].dtype == jnp.bfloat16 and out["x"][1] == "text" and out["o"] is o
    assert Precision("bf16-mixed").cast_to_param(o) is o


@pytest.mark.parametrize("name", IN_SCOPE)
def test_to_jmp_matches_the_policy(name):
    prec = Precision(name)
    jp = prec.to_jmp()
    assert isinstance(jp, jmp.Policy)
    assert (jp.param_dtype, jp.compute_dtype, jp.output_dtype) == (prec.param_dtype, prec.compute_dtype,
                                                                    prec.output_dtype)
    x = {"a": jnp.ones(2), "n": jnp.arange(2)}
    assert jax.tree.map(lambda a: a.dtype, prec.cast_to_compute(x)) == jax.tree.map(
        lambda a: a.dtype, jp.cast_to_compute(x))


@pytest.mark.parametrize("name", [n for n, p in presets().items() if p.quantization and not p.fp8])  # fp8: test_jax_fp8
def test_quantization_presets_are_accepted(name):  # the layers: tests/jax/test_jax_quant_layers.py
    assert Precision(name).policy.quantization.mode == presets()[name].quantization.mode


def test_float64_without_x64_fails_when_asked_not_to_enable_it(x64):
    jax.config.update("jax_enable_x64", False)
    with pytest.raises(PolicyError, match="jax_enable_x64 is off"):
        Precision("64-true", enable_x64=False)
    assert not jax.config.read("jax_enable_x64")


def test_device_caps_and_check():
    caps = device_caps()
    assert caps.backend == "jax" and caps.platform == jax.devices()[0].platform
    report = Precision("16-mixed").check()
    assert report.ok and any("float16 on CPU" in f.message for f in report.notes)


def test_a_policy_the_device_cannot_run_is_refused_with_its_fallback():
    v100 = DeviceCaps("cuda", "V100", (7, 0), backend="jax")
    with pytest.raises(PolicyError, match=r"bfloat16 needs compute capability.*Fallback: \"16-mixed\""):
        Precision("bf16-mixed", caps=v100)
    with pytest.raises(PolicyError, match="TPUs have no float64"):
        Precision("64-true", caps=DeviceCaps("tpu", backend="jax"))


def test_params_created_in_param_dtype_with_overrides_by_path():
    prec = Precision("params=bf16,compute=bf16,output=f32,@fc2=(params=f32,compute=f32)")
    x = jnp.ones((2, D))
    params = prec.init(MLP(), jax.random.key(0), x)["params"]
    assert params["fc1"]["kernel"].dtype == jnp.bfloat16
    assert params["fc2"]["kernel"].dtype == jnp.float32

    seen = {}

    def probe(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        seen[".".join(ctx.module.path)] = out.dtype
        return out

    with nn.intercept_methods(probe):  # outer: sees what the policy interceptor returns
        y = prec.apply(MLP(), {"params": params}, x)
    assert seen["fc1"] == jnp.bfloat16 and seen["fc2"] == jnp.float32 and y.dtype == jnp.float32


def test_jit_grad_vmap_through_the_interceptor():
    prec = Precision("bf16-mixed")
    x = jax.random.normal(jax.random.key(1), (3, 5, D))
    params = prec.init(MLP(), jax.random.key(0), x[0])["params"]
    f = lambda p, xi: prec.apply(MLP(), {"params": p}, xi)  # noqa: E731
    batched = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, x)
    one = jax.jit(f)  # jitted too: eager bf16 GELU rounds per op, fused XLA code does not
    eager = jnp.stack([one(params, xi) for xi in x])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(eager))
    g = jax.jit(jax.grad(lambda p: jnp.sum(f(p, x[0]) ** 2)))(params)
    assert g["fc1"]["kernel"].dtype == jnp.float32 and bool(jnp.isfinite(g["fc1"]["kernel"]).all())
    assert float(jnp.abs(g["fc1"]["kernel"]).sum()) > 0
