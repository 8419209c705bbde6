"""Loss-scale trajectories equal dualprec.ref bit for bit (and jmp where its rule coincides),
under jit, with injected overflow; the jmp min_loss_scale bug is not inherited."""

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from dualprec import LossScaleConfig
from dualprec.ref import loss_scale_init as ref_init
from dualprec.ref import loss_scale_update as ref_update
from dualprec_jax import all_finite, loss_scale_init, loss_scale_update, scale_loss, unscale


def _ours(seq, cfg):
    def body(state, finite):
        state = loss_scale_update(state, finite, cfg)
        return state, (state.scale, state.counter)
    _, (scales, counters) = jax.jit(lambda s, f: jax.lax.scan(body, s, f))(loss_scale_init(cfg), jnp.asarray(seq))
    return np.asarray(scales), np.asarray(counters)


def _ref(seq, cfg):
    state, out = ref_init(cfg), []
    for finite in seq:
        state = ref_update(state, bool(finite), cfg)
        out.append((state.scale, state.counter))
    return np.array([s for s, _ in out], np.float32), np.array([c for _, c in out])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(init_scale=1024.0, growth_factor=1.1, backoff_factor=0.7, growth_interval=2),
    dict(init_scale=3.0, growth_factor=1.5, backoff_factor=0.9, growth_interval=1),
    dict(init_scale=2.0**126, growth_interval=2),                      # growth overflows: kept
    dict(init_scale=4.0, growth_interval=1, min_scale=1.0, max_scale=16.0),
    dict(init_scale=1.0, backoff_factor=0.25),                         # underflows towards 0
])
@pytest.mark.parametrize("seed", [0, 1])
def test_trajectory_matches_reference_bit_for_bit(kw, seed):
    cfg = LossScaleConfig("dynamic", **{"growth_interval": 3, **kw})
    seq = np.random.default_rng(seed).random(60) > 0.3
    ours_s, ours_c = _ours(seq, cfg)
    ref_s, ref_c = _ref(seq, cfg)
    assert ours_s.dtype == np.float32
    np.testing.assert_array_equal(ours_s.view(np.uint32), ref_s.view(np.uint32))
    np.testing.assert_array_equal(ours_c, ref_c)


def test_matches_jmp_where_rules_coincide():
    cfg = LossScaleConfig("dynamic", growth_interval=4)
    seq = np.random.default_rng(2).random(50) > 0.2
    ls, expect = jmp.DynamicLossScale(jnp.float32(2.0**16), period=4), []
    for finite in seq:
        ls = ls.adjust(jnp.asarray(finite))
        expect.append(float(ls.loss_scale))
    np.testing.assert_array_equal(_ours(seq, cfg)[0], np.array(expect, np.float32))


def test_jmp_loses_min_loss_scale_under_jit_and_we_do_not():
    floor = 8.0
    theirs = jmp.DynamicLossScale(jnp.float32(16.0), min_loss_scale=jnp.float32(floor), period=10)
    theirs = jax.jit(lambda s: s)(theirs)  # any flatten/unflatten resets the floor to 1
    for _ in range(3):
        theirs = theirs.adjust(jnp.asarray(False))
    assert float(theirs.loss_scale) == 2.0  # the floor of 8 was silently dropped
    cfg = LossScaleConfig("dynamic", init_scale=16.0, min_scale=floor)
    ours = jax.jit(lambda s: s)(loss_scale_init(cfg))
    for _ in range(3):
        ours = jax.jit(loss_scale_update, static_argnums=2)(ours, jnp.asarray(False), cfg)
    assert float(ours.scale) == floor


def test_static_and_none_never_change():
    for cfg, expect in [(LossScaleConfig.static(128.0), 128.0), (LossScaleConfig.none(), 1.0)]:
        scales, _ = _ours([False, True, False], cfg)
        assert set(scales.tolist()) == {expect}


def test_all_finite_upcasts_and_ignores_integer_leaves():
    big64 = np.array([1e39])  # finite in float64 (checked in float64, as GradScaler does) ...
    with jax.enable_x64(True):
        assert bool(all_finite({"a": jnp.ones(3), "b": jnp.asarray(big64)}))
    # ... but without x64 JAX holds it as float32, where it is inf
    assert not bool(all_finite({"a": jnp.ones(3), "b": big64}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": big64.astype(np.float32)}))
    assert bool(all_finite({"a": jnp.ones(3, jnp.bfloat16), "n": jnp.arange(3)}))
    assert not bool(all_finite([jnp.array([0.0, jnp.nan], jnp.float16)]))


def test_unscale_and_scale_loss_in_float32():
    state = loss_scale_init(LossScaleConfig("dynamic"))
    g = unscale({"w": jnp.full((2,), 2.0**16, jnp.bfloat16), "i": jnp.arange(2)}, state)
    assert g["w"].dtype == jnp.float32 and float(g["w"][0]) == 1.0 and g["i"].dtype == jnp.int32
    loss = scale_loss(jnp.asarray(2.0, jnp.float16), state)  # 2 * 2**16 overflows float16
    assert loss.dtype == jnp.float32 and float(loss) == 2.0**17


def test_config_must_be_a_loss_scale():
    with pytest.raises(TypeError, match="dualprec.LossScaleConfig"):
        loss_scale_init({"kind": "dynamic"})
