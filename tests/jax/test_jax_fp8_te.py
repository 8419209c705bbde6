"""The Transformer Engine (JAX) adapter against a stand-in `transformer_engine` package: the
Policy -> TE recipe mapping, the autocast call (TE 2.x ``autocast`` and the older
``fp8_autocast``), stock Dense layers on TE's quantized GEMM with metadata in ``fp8_metas``,
and engine selection.  TE itself cannot be installed here."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec import DeviceCaps
from dualprec.errors import PolicyError, UnsupportedPolicyError
from dualprec_jax import Precision, fp8
from dualprec_jax import te as jte

H200 = DeviceCaps(platform="cuda", name="NVIDIA H200", compute_capability=(9, 0), backend="jax",
                  transformer_engine=True)


def _stand_in(monkeypatch, *, old_api=False, jax_recipes=("DelayedScaling", "Float8CurrentScaling",
                                                           "MXFP8BlockScaling", "NVFP4BlockScaling"),
              nvfp4_switches=True):
    """Install a fake transformer_engine (common.recipe, jax, jax.flax, jax.sharding,
    jax.quantize, jax.quantize.helper).  ``jax_recipes``: the recipe classes its
    ``helper.get_quantize_config_class`` accepts (TE 2.8 has no NVFP4BlockScaling there);
    ``nvfp4_switches``: whether its NVFP4 config reads the three ``disable_*`` switches."""
    calls = []

    class Format(enum.Enum):
        E2M1 = "E2M1"
        E4M3 = "E4M3"
        HYBRID = "HYBRID"

    # TE 2.x's block recipes, with its field names and defaults
    @dataclasses.dataclass(frozen=True)
    class MXFP8BlockScaling:
        margin: int = 0
        fp8_format: Format = Format.E4M3

    @dataclasses.dataclass(frozen=True)
    class Float8BlockScaling:
        fp8_format: Format = Format.E4M3

    @dataclasses.dataclass(frozen=True)
    class NVFP4BlockScaling:
        disable_rht: bool = False
        disable_stochastic_rounding: bool = False
        disable_2d_quantization: bool = False
        fp4_format: Format = Format.E2M1

    @dataclasses.dataclass(frozen=True)
    class DelayedScaling:
        margin: int = 0
        fp8_format: Format = Format.HYBRID
        amax_history_len: int = 1024
        amax_compute_algo: str = "max"

    @dataclasses.dataclass(frozen=True)
    class Float8CurrentScaling:
        fp8_format: Format = Format.HYBRID

    @dataclasses.dataclass(frozen=True)
    class MeshResource:
        dp_resource: str | None = None

    @contextlib.contextmanager
    def autocast(enabled=False, recipe=None, mesh_resource=None):
        calls.append(("autocast", enabled, recipe, mesh_resource))
        yield

    @contextlib.contextmanager
    def fp8_autocast(enabled=False, fp8_recipe=None, mesh_resource=None):
        calls.append(("fp8_autocast", enabled, fp8_recipe, mesh_resource))
        yield

    def make_dot_general_cls(recipe):
        calls.append(("make_dot_general_cls", recipe))

        class TEDotGeneral(nn.Module):
            @nn.compact
            def __call__(self, lhs, rhs, dims, precision=None, preferred_element_type=None, **kw):
                # TE keeps scales and amax histories here (updated through their gradients)
                self.variable("fp8_metas", "amax_history", lambda: jnp.zeros((recipe_len(recipe),)))
                return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)

        return TEDotGeneral

    def recipe_len(recipe):
        return getattr(recipe, "amax_history_len", 1)

    root = types.ModuleType("transformer_engine")
    common = types.ModuleType("transformer_engine.common")
    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.Format, recipe_mod.DelayedScaling, recipe_mod.Float8CurrentScaling = Format, DelayedScaling, Float8CurrentScaling
    tej = types.ModuleType("transformer_engine.jax")
    if old_api:
        tej.fp8_autocast = fp8_autocast
    else:
        tej.autocast = autocast
        tej.fp8_autocast = fp8_autocast  # TE 2.x keeps the old name as a deprecated alias
    flax_mod = types.ModuleType("transformer_engine.jax.flax")
    flax_mod.make_dot_general_cls = make_dot_general_cls
    sharding = types.ModuleType("transformer_engine.jax.sharding")
    sharding.MeshResource = MeshResource
    recipe_mod.MXFP8BlockScaling, recipe_mod.Float8BlockScaling = MXFP8BlockScaling, Float8BlockScaling
    recipe_mod.NVFP4BlockScaling = NVFP4BlockScaling
    quantize = types.ModuleType("transformer_engine.jax.quantize")
    quantize.NVTE_FP8_COLLECTION_NAME = "fp8_metas"
    helper = types.ModuleType("transformer_engine.jax.quantize.helper")

    class NVFP4ScalingQuantizeConfig:
        pass

    if nvfp4_switches:
        NVFP4ScalingQuantizeConfig.DISABLE_STOCHASTIC_ROUNDING = False
        NVFP4ScalingQuantizeConfig.DISABLE_RHT = False
        NVFP4ScalingQuantizeConfig.DISABLE_2D_QUANTIZATION = False

    def get_quantize_config_class(fp8_recipe):  # TE's: a config class per recipe, ValueError otherwise
        if type(fp8_recipe).__name__ not in jax_recipes:
            raise ValueError(f"Unsupported recipe type: {type(fp8_recipe)}")
        return NVFP4ScalingQuantizeConfig if isinstance(fp8_recipe, NVFP4BlockScaling) else object

    helper.get_quantize_config_class = get_quantize_config_class
    for name, mod in {"transformer_engine": root, "transformer_engine.common": common,
                      "transformer_engine.common.recipe": recipe_mod, "transformer_engine.jax": tej,
                      "transformer_engine.jax.flax": flax_mod, "transformer_engine.jax.sharding": sharding,
                      "transformer_engine.jax.quantize": quantize,
                      "transformer_engine.jax.quantize.helper": helper}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    root.common, common.recipe, root.jax = common, recipe_mod, tej
    tej.flax, tej.sharding, tej.quantize, quantize.helper = flax_mod, sharding, quantize, helper
    jte._cls_for.cache_clear()
    return calls, recipe_mod


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc2")(nn.relu(nn.Dense(8, name="fc1")(x)))


def test_policy_to_te_recipe_mapping(monkeypatch):
    _, recipe_mod = _stand_in(monkeypatch)
    from dualprec import Policy

    r = jte.te_recipe(Policy.parse("transformer-engine").fp8)
    assert r == recipe_mod.DelayedScaling(margin=0, fp8_format=recipe_mod.Format.HYBRID, amax_history_len=1024,
                                          amax_compute_algo="max")
    r = jte.te_recipe(Policy.parse("bf16-mixed,fp8=delayed(history_len=16,margin=2,amax_algo=most_recent,"
                                   "format=e4m3,engine=te)").fp8)
    assert r == recipe_mod.DelayedScaling(margin=2, fp8_format=recipe_mod.Format.E4M3, amax_history_len=16,
                                          amax_compute_algo="most_recent")
    r = jte.te_recipe(Policy.parse("bf16-mixed,fp8=current(engine=te)").fp8)
    assert r == recipe_mod.Float8CurrentScaling(fp8_format=recipe_mod.Format.HYBRID)
    assert jte.collection_name() == "fp8_metas"


@pytest.mark.parametrize("old_api", [False, True], ids=["te2-autocast", "fp8_autocast"])
def test_precision_runs_dense_on_te_gemm_inside_te_autocast(monkeypatch, old_api):
    calls, recipe_mod = _stand_in(monkeypatch, old_api=old_api)
    prec = Precision("transformer-engine", caps=H200)
    assert fp8.engine(prec.policy, H200) == "transformer-engine"
    model = _Model()
    x = np.ones((2, 16), np.float32)
    v = prec.init(model, jax.random.PRNGKey(0), x)
    assert set(v) == {"params", "fp8_metas"} and fp8.FP8_COLLECTION not in v
    assert set(v["fp8_metas"]) == {"fc1", "fc2"}
    y = prec.apply(model, v, x)
    assert y.dtype == jnp.float32 and y.shape == (2, 4)
    name = "fp8_autocast" if old_api else "autocast"
    autocasts = [c for c in calls if c[0] == name]
    assert autocasts and all(c[1] is True for c in autocasts)
    assert isinstance(autocasts[0][2], recipe_mod.DelayedScaling) and autocasts[0][3] is not None
    # params in the policy's dtype (bf16 weights for the transformer-engine preset)
    assert v["params"]["fc1"]["kernel"].dtype == jnp.bfloat16


def test_auto_engine_picks_te_on_hopper_and_native_on_cpu(monkeypatch):
    _stand_in(monkeypatch)
    policy = "params=float32,compute=bfloat16,output=float32,fp8=delayed"
    assert fp8.engine(Precision(policy, caps=H200).policy, H200) == "transformer-engine"
    cpu = DeviceCaps(platform="cpu", backend="jax", transformer_engine=True)
    assert fp8.engine(Precision(policy, caps=cpu).policy, cpu) == "native"
    forced = "params=float32,compute=bfloat16,output=float32,fp8=delayed(engine=native)"
    assert fp8.engine(Precision(forced, caps=H200).policy, H200) == "native"


def test_te_engine_without_te_fails_clearly():
    assert not jte.available()
    with pytest.raises(PolicyError, match="Transformer Engine is not installed"):
        Precision("transformer-engine")
    with pytest.raises(UnsupportedPolicyError, match="transformer_engine.jax does not import"):
        with jte.autocast("transformer-engine"):
            pass


def test_pre_ada_gpu_is_refused_naming_its_capability(monkeypatch):
    _stand_in(monkeypatch)
    a100 = DeviceCaps(platform="cuda", name="NVIDIA A100", compute_capability=(8, 0), backend="jax",
                      transformer_engine=True)
    with pytest.raises(PolicyError, match="8.0"):
        Precision("params=float32,compute=bfloat16,output=float32,fp8=delayed", caps=a100)


# --------------------------------------------------------------------------- block recipes

B200 = DeviceCaps(platform="cuda", name="NVIDIA B200", compute_capability=(10, 0), backend="jax",
                  transformer_engine=True)


def test_block_recipes_map_to_te_block_recipe_classes(monkeypatch):
    _, r = _stand_in(monkeypatch)
    from dualprec import Policy

    def te_of(spec):
        return jte.te_recipe(Policy.parse(f"bf16-mixed,fp8={spec}").fp8)

    assert te_of("mxfp8") == r.MXFP8BlockScaling(fp8_format=r.Format.E4M3)
    assert te_of("mxfp8(rounding=rceil,format=hybrid)") == r.MXFP8BlockScaling(fp8_format=r.Format.HYBRID)
    assert te_of("nvfp4") == r.NVFP4BlockScaling(disable_rht=False, disable_stochastic_rounding=False,
                                                 disable_2d_quantization=False)
    assert te_of("nvfp4(sr=false)") == r.NVFP4BlockScaling(disable_stochastic_rounding=True)
    assert te_of("nvfp4(rht=false)") == r.NVFP4BlockScaling(disable_rht=True)
    assert te_of("nvfp4(wblocks=1x16)") == r.NVFP4BlockScaling(disable_2d_quantization=True)
    assert te_of("nvfp4(sr=false,rht=false,wblocks=1x16)") == r.NVFP4BlockScaling(
        disable_rht=True, disable_stochastic_rounding=True, disable_2d_quantization=True)
    # the three switches are always passed: TE's own defaults come from NVTE_NVFP4_* variables
    assert jte.recipe_kwargs(Policy.parse("bf16-mixed,fp8=nvfp4").fp8) == ("NVFP4BlockScaling", {
        "disable_stochastic_rounding": False, "disable_rht": False, "disable_2d_quantization": False})


@pytest.mark.parametrize("spec, match", [
    ("rowwise", r"fp8=rowwise: torchao's row-wise recipe .* no Transformer Engine recipe.*engine=native"),
    ("rowwise_with_gw_hp", r"fp8=rowwise_with_gw_hp: .*engine=native"),
    ("mxfp8(rounding=floor)", r"fp8=mxfp8\(rounding=floor\): .*RCEIL.*engine=native"),
    ("mxfp8(rounding=even)", r"rounding=even.*engine=native"),
    ("mxfp8(rounding=ceil)", r"rounding=ceil.*engine=native"),
])
def test_options_te_lacks_are_refused_naming_them(monkeypatch, spec, match):
    _stand_in(monkeypatch)
    from dualprec import Policy

    recipe = Policy.parse(f"bf16-mixed,fp8={spec}").fp8
    with pytest.raises(UnsupportedPolicyError, match=match):
        jte.te_recipe(recipe)
    # Precision's device check refuses it before anything runs (its fallback: engine=native)
    forced = spec[:-1] + ",engine=te)" if "(" in spec else spec + "(engine=te)"
    with pytest.raises(PolicyError, match=match.replace(r"fp8=", r"fp8\.engine: fp8=", 1)):
        Precision(f"bf16-mixed,fp8={forced}", caps=B200)
    assert not jte.supports(recipe)


def test_te_jax_missing_recipes_and_ignored_switches_are_refused(monkeypatch):
    from dualprec import Policy

    nvfp4 = Policy.parse("bf16-mixed,fp8=nvfp4").fp8
    # TE 2.8: NVFP4BlockScaling is in common.recipe, but TE-JAX does not run it
    _stand_in(monkeypatch, jax_recipes=("DelayedScaling", "Float8CurrentScaling", "MXFP8BlockScaling"))
    with pytest.raises(UnsupportedPolicyError, match=r"Transformer Engine for JAX does not run NVFP4BlockScaling "
                                                     r"\(TE-JAX runs it from 2.9\).*engine=native"):
        jte.te_recipe(nvfp4)
    assert not jte.supports(nvfp4) and jte.supports(Policy.parse("bf16-mixed,fp8=mxfp8").fp8)
    # auto falls back to the native engine on such a TE; a forced engine=te is refused
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=nvfp4"), B200) == "native"
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=mxfp8"), B200) == "transformer-engine"
    # a TE-JAX whose NVFP4 config does not read the switches: the defaults run, a switch is refused
    _stand_in(monkeypatch, nvfp4_switches=False)
    jte.te_recipe(nvfp4)
    for spec, field in (("sr=false", "disable_stochastic_rounding"), ("rht=false", "disable_rht"),
                        ("wblocks=1x16", "disable_2d_quantization")):
        with pytest.raises(UnsupportedPolicyError, match=rf"fp8=nvfp4\({spec}\): .*ignores .*{field}"):
            jte.te_recipe(Policy.parse(f"bf16-mixed,fp8=nvfp4({spec})").fp8)
    # a TE without the class at all
    _, r = _stand_in(monkeypatch)
    monkeypatch.delattr(r, "NVFP4BlockScaling")
    with pytest.raises(UnsupportedPolicyError, match=r"has no NVFP4BlockScaling"):
        jte.te_recipe(nvfp4)


def test_auto_engine_for_block_recipes(monkeypatch):
    from dualprec import Policy

    _stand_in(monkeypatch)
    cpu = DeviceCaps(platform="cpu", backend="jax", transformer_engine=False)
    for spec in ("rowwise", "mxfp8", "nvfp4", "mxfp8(rounding=floor)"):
        assert fp8.engine(Policy.parse(f"bf16-mixed,fp8={spec}"), cpu) == "native"  # no TE, no GPU
    # Hopper: TE runs MXFP8 and NVFP4 on Blackwell only
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=mxfp8"), H200) == "native"
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=nvfp4"), H200) == "native"
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=nvfp4"), B200) == "transformer-engine"
    # options TE lacks: native under auto
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=mxfp8(rounding=floor)"), B200) == "native"
    assert fp8.engine(Policy.parse("bf16-mixed,fp8=rowwise"), B200) == "native"
    # forced onto TE on a Hopper GPU: refused naming the capability TE needs, fallback native
    with pytest.raises(PolicyError, match=r"runs MXFP8BlockScaling on compute capability >= 10\.0; "
                                          r"NVIDIA H200 has 9\.0.*engine=native"):
        Precision("bf16-mixed,fp8=mxfp8(engine=te)", caps=H200)


def test_precision_runs_mxfp8_on_te_gemm_with_the_te_recipe(monkeypatch):
    calls, r = _stand_in(monkeypatch)
    prec = Precision("bf16-mixed,fp8=mxfp8(engine=te)", caps=B200)
    model = _Model()
    x = np.ones((2, 16), np.float32)
    v = prec.init(model, jax.random.PRNGKey(0), x)
    prec.apply(model, v, x)
    autocasts = [c for c in calls if c[0] == "autocast"]
    assert autocasts and all(c[2] == r.MXFP8BlockScaling(fp8_format=r.Format.E4M3) for c in autocasts)
    made = [c[1] for c in calls if c[0] == "make_dot_general_cls"]
    assert made == [r.MXFP8BlockScaling(fp8_format=r.Format.E4M3)]
    # the native block state is not created under TE (TE keeps its own, or none)
    assert "blockscale" not in str(jax.tree_util.tree_structure(v))


def test_te_nvfp4_apply_needs_the_sr_rng_stream(monkeypatch):
    calls, r = _stand_in(monkeypatch)
    model, x = _Model(), np.ones((2, 16), np.float32)
    prec = Precision("bf16-mixed,fp8=nvfp4(engine=te)", caps=B200)
    v = prec.init(model, jax.random.PRNGKey(0), x)
    with pytest.raises(UnsupportedPolicyError, match=r'"sr_rng" RNG stream; pass apply\(\.\.\., rngs='):
        prec.apply(model, v, x)
    prec.apply(model, v, x, rngs={"sr_rng": jax.random.PRNGKey(1)})
    assert [c[2] for c in calls if c[0] == "autocast"][-1] == r.NVFP4BlockScaling()
    # without stochastic rounding no stream is needed
    Precision("bf16-mixed,fp8=nvfp4(sr=false,engine=te)", caps=B200).apply(model, v, x)
