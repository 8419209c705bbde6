"""Loss-scale state machine against torch.amp.GradScaler and jmp.DynamicLossScale."""

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
import torch

from dualprec.ref import LossScaleState, all_finite, loss_scale_init, loss_scale_update, unscale
from tests.ref.conftest import make_loss_scale


def _torch_trajectory(finite_seq, cfg):
    """Drive a real GradScaler with a tiny model; inject inf grads on overflow steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                                  backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval)
    out = []
    for finite in finite_seq:
        opt.zero_grad()
        # Zero loss keeps every gradient finite however large the scale; overflow is injected.
        loss = (model(torch.ones(2, 3)) * 0).sum()
        scaler.scale(loss).backward()
        if not finite:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        out.append((np.float32(scaler.get_scale()), int(scaler._growth_tracker.item())))
    return out


def _ref_trajectory(finite_seq, cfg):
    state = loss_scale_init(cfg)
    out = []
    for finite in finite_seq:
        state = loss_scale_update(state, finite, cfg)
        out.append((state.scale, state.counter))
    return out


@pytest.mark.parametrize("factors", [(2.0, 0.5, 3), (1.1, 0.7, 2), (3.0, 0.25, 1), (1.5, 0.9, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_gradscaler_on_random_sequences(factors, seed):
    growth, backoff, interval = factors
    cfg = make_loss_scale(init_scale=1024.0, growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    seq = list(np.random.default_rng(seed).random(40) > 0.3)
    theirs = _torch_trajectory(seq, cfg)
    ours = _ref_trajectory(seq, cfg)
    assert [(s.view(np.uint32), c) for s, c in ours] == [(s.view(np.uint32), c) for s, c in theirs]


def test_matches_gradscaler_on_scripted_overflow_and_growth_to_inf():
    cfg = make_loss_scale(init_scale=2.0**100, growth_factor=2.0**20, growth_interval=2)
    seq = [True, True, True, True, False, True, True] + [False] * 5
    assert _ref_trajectory(seq, cfg) == _torch_trajectory(seq, cfg)
    # 2**120 * 2**20 overflows: the scale stays put and the counter still resets.
    assert _ref_trajectory([True] * 4, cfg)[-1] == (np.float32(2.0**120), 0)


def test_the_scale_stays_in_the_shared_range_where_gradscaler_leaves_it():
    """The documented difference: every dualprec scale stays in [2**-126, 2**126] (XLA would
    flush a subnormal scale, or a subnormal 1/scale, to zero); GradScaler goes on."""
    up = make_loss_scale(init_scale=2.0**126, growth_interval=1)
    assert _torch_trajectory([True], up)[-1] == (np.float32(2.0**127), 0)
    assert _ref_trajectory([True], up)[-1] == (np.float32(2.0**126), 0)
    down = make_loss_scale(init_scale=2.0**-125)
    assert [s for s, _ in _torch_trajectory([False] * 3, down)] == [np.float32(2.0**-e) for e in (126, 127, 128)]
    assert [s for s, _ in _ref_trajectory([False] * 3, down)] == [np.float32(2.0**-126)] * 3


def test_min_and_max_clamp():
    cfg = make_loss_scale(init_scale=4.0, growth_interval=1, min_scale=1.0, max_scale=16.0)
    traj = _ref_trajectory([False, False, False, True, True, True, True, True], cfg)
    assert [float(s) for s, _ in traj] == [2.0, 1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 16.0]


def test_static_and_none_never_change():
    for kind, expected in [("static", 128.0), ("none", 1.0)]:
        cfg = make_loss_scale(kind=kind, init_scale=128.0)
        assert {s for s, _ in _ref_trajectory([False, True, False], cfg)} == {np.float32(expected)}


def test_bad_kind_names_the_attribute():
    with pytest.raises(ValueError, match="config.kind"):
        loss_scale_init(make_loss_scale(kind="dynamc"))


def test_state_round_trips_exactly():
    state = LossScaleState(np.float32(1.1) * np.float32(3.3), 17)
    back = LossScaleState.from_dict(state.to_dict())
    assert back == state and back.scale.view(np.uint32) == state.scale.view(np.uint32)
    assert type(state.to_dict()["scale"]) is float
    with pytest.raises(ValueError, match="counter"):
        LossScaleState.from_dict({"scale": 1.0})


def test_all_finite_upcasts_and_unscale_multiplies_by_fp32_reciprocal():
    assert all_finite({"a": np.ones(3, np.float16), "b": [np.zeros(2)]})
    assert not all_finite({"a": np.ones(3, np.float16), "b": [np.array([np.nan])]})
    assert all_finite([np.array([1e39])])  # float64 is checked in float64, as GradScaler does
    assert not all_finite([np.array([np.inf], np.float32)])
    state = LossScaleState(np.float32(3.0), 0)
    g = unscale({"w": np.array([3.0, 6.0], np.float32)}, state)
    inv = np.float32(1) / np.float32(3)
    assert np.array_equal(g["w"], np.array([3.0, 6.0], np.float32) * inv)


def _jmp_trajectory(seq, period, init, jit):
    ls = jmp.DynamicLossScale(jnp.float32(init), period=period, min_loss_scale=jnp.float32(1.0))
    adjust = jax.jit(lambda s, f: s.adjust(f)) if jit else (lambda s, f: s.adjust(f))
    out = []
    for finite in seq:
        ls = adjust(ls, jnp.bool_(finite))
        out.append((np.float32(ls.loss_scale), int(ls.counter)))
    return out


def test_matches_jmp_where_semantics_coincide():
    # jmp: factor 2 both ways, floor min_loss_scale (1.0 here), growth only if finite.
    seq = list(np.random.default_rng(3).random(60) > 0.25) + [False] * 20
    cfg = make_loss_scale(init_scale=64.0, growth_interval=3, min_scale=1.0)
    assert _ref_trajectory(seq, cfg) == _jmp_trajectory(seq, 3, 64.0, jit=False)
    assert _ref_trajectory(seq, cfg) == _jmp_trajectory(seq, 3, 64.0, jit=True)


def test_jmp_loses_a_custom_floor_under_jit():
    """Known jmp bug, not copied: min_loss_scale is not part of its pytree, so jit drops it."""
    ls = jmp.DynamicLossScale(jnp.float32(64.0), period=10, min_loss_scale=jnp.float32(16.0))
    eager, jitted = ls, ls
    step = jax.jit(lambda s: s.adjust(jnp.bool_(False)))
    for _ in range(5):
        eager, jitted = eager.adjust(jnp.bool_(False)), step(jitted)
    assert float(eager.loss_scale) == 16.0
    assert float(jitted.loss_scale) == 2.0  # floored at the default 1.0 instead
    cfg = make_loss_scale(init_scale=64.0, growth_interval=10, min_scale=16.0)
    assert float(_ref_trajectory([False] * 5, cfg)[-1][0]) == 16.0


def test_jmp_float32_product_differs_from_gradscaler_for_inexact_factors():
    """Why the reference follows torch: jmp multiplies in float32, GradScaler in float64."""
    scale, factor = np.float32(1.0), 1.1
    ours = loss_scale_update(LossScaleState(scale, 0), True,
                             make_loss_scale(growth_factor=factor, growth_interval=1)).scale
    jmp_like = np.float32(scale) * np.float32(factor)
    assert ours == np.float32(np.float64(scale) * factor)
    diverging = [s for s in (np.float32(v) for v in np.linspace(1, 2, 2000))
                 if np.float32(np.float64(s) * 1.1) != s * np.float32(1.1)]
    assert diverging, "expected some float32 scales where the two products round differently"
    assert jmp_like == np.float32(1.1)
