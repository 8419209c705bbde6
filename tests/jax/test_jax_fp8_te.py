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


def _stand_in(monkeypatch, *, old_api=False):
    """Install a fake transformer_engine (common.recipe, jax, jax.flax, jax.sharding, jax.quantize)."""
    calls = []

    class Format(enum.Enum):
        E4M3 = "E4M3"
        HYBRID = "HYBRID"

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
    quantize = types.ModuleType("transformer_engine.jax.quantize")
    quantize.NVTE_FP8_COLLECTION_NAME = "fp8_metas"
    for name, mod in {"transformer_engine": root, "transformer_engine.common": common,
                      "transformer_engine.common.recipe": recipe_mod, "transformer_engine.jax": tej,
                      "transformer_engine.jax.flax": flax_mod, "transformer_engine.jax.sharding": sharding,
                      "transformer_engine.jax.quantize": quantize}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    root.common, common.recipe, root.jax = common, recipe_mod, tej
    tej.flax, tej.sharding, tej.quantize = flax_mod, sharding, quantize
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
