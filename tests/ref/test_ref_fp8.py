"""FP8 recipes against Flax's fp8_ops (scale and amax history) and torch float8 casts."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax.linen import fp8_ops

from dualprec.ref import (
    FP8State,
    dequantize_fp8,
    fp8_current_scale,
    fp8_delayed_init,
    fp8_delayed_update,
    fp8_gemm_qdq,
    nan_equal,
    quantize_fp8,
)
from dualprec.ref.fp8 import amax
from tests.ref.conftest import make_recipe


def _tensors(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 8)) * np.exp(rng.uniform(-6, 6))).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("role,q_dtype", [("input", jnp.float8_e4m3fn), ("grad_output", jnp.float8_e5m2)])
def test_history_and_scale_trajectories_match_flax(role, q_dtype):
    """Flax keeps 1/scale and updates at the start of a step; the reference keeps TE's
    scale updated at the end of the previous step. Aligned, histories are bit-identical and
    Flax's stored value is float32(1/scale) of ours."""
    recipe = make_recipe(history_len=16)
    state = fp8_delayed_init(recipe, [role])
    f_scale, f_hist = jnp.float32(1.0), jnp.zeros(16, jnp.float32)
    for x in _tensors(40):
        # Flax computes step t's scale from history through t-1: our state's scale.
        f_scale, f_hist = fp8_ops.update_fp8_meta(jnp.asarray(x), q_dtype, f_scale, f_hist)
        assert np.float32(f_scale) == np.float32(np.float32(1) / state[role].scale)
        state = fp8_delayed_update(state, role, amax(x), recipe)
        assert np.array_equal(np.asarray(f_hist), state[role].amax_history)


def test_zero_and_nonfinite_amax_keep_the_previous_scale():
    recipe = make_recipe(history_len=2)
    state = fp8_delayed_update(fp8_delayed_init(recipe, ["input"]), "input", np.float32(2.0), recipe)
    assert state["input"].scale == np.float32(224.0)
    # Step with amax 0: history max is still 2 (scale unchanged); then only zeros remain.
    for a in (0.0, 0.0, 0.0):
        state = fp8_delayed_update(state, "input", np.float32(a), recipe)
    assert state["input"].scale == np.float32(224.0)
    state = fp8_delayed_update(state, "input", np.float32(np.inf), recipe)
    assert state["input"].scale == np.float32(224.0)


def test_most_recent_and_margin():
    recipe = make_recipe(history_len=4, amax_algo="most_recent", margin=1)
    state = fp8_delayed_init(recipe, ["weight"])
    for a in (8.0, 2.0):
        state = fp8_delayed_update(state, "weight", np.float32(a), recipe)
    assert state["weight"].scale == np.float32(448.0 / 2.0 / 2.0)
    assert state["weight"].amax_history.tolist() == [2.0, 0.0, 0.0, 8.0]


@pytest.mark.parametrize("fmt,tdtype", [("float8_e4m3fn", torch.float8_e4m3fn), ("float8_e5m2", torch.float8_e5m2)])
def test_quantized_values_match_torch_saturating_cast(fmt, tdtype):
    x = np.concatenate(_tensors(5)).reshape(-1)
    x[:3] = [1e9, -1e9, np.nan]
    scale = np.float32(37.5)
    ours = quantize_fp8(x, scale, fmt)
    limit = 448.0 if fmt == "float8_e4m3fn" else 57344.0
    t = (torch.from_numpy(x) * torch.tensor(scale)).clamp(-limit, limit).to(tdtype)
    theirs = t.view(torch.uint8).numpy().view(getattr(ml_dtypes, fmt))
    assert nan_equal(ours, theirs)
    deq = dequantize_fp8(ours, scale)
    assert np.array_equal(deq[3:], ours[3:].astype(np.float32) * (np.float32(1) / scale))


def test_current_scaling():
    x = np.array([[0.5, -4.0]], np.float32)
    assert fp8_current_scale(x, "float8_e4m3fn") == np.float32(112.0)
    assert fp8_current_scale(np.zeros(3), "float8_e5m2") == np.float32(1.0)
    xq, wq, gq, state = fp8_gemm_qdq(x, x, None, make_recipe(scaling="current"))
    assert state is None and gq is None and np.array_equal(xq, x)


def test_gemm_qdq_uses_previous_scale_then_records_amax():
    recipe = make_recipe(history_len=8)
    state = fp8_delayed_init(recipe)
    xs, ws, gs = _tensors(3, 1), _tensors(3, 2), _tensors(3, 3)
    for t in range(3):
        before = state
        xq, wq, gq, state = fp8_gemm_qdq(xs[t], ws[t], state, recipe, grad_output=gs[t])
        assert np.array_equal(xq, dequantize_fp8(quantize_fp8(xs[t], before["input"].scale, "float8_e4m3fn"),
                                                 before["input"].scale))
        assert np.array_equal(gq, dequantize_fp8(quantize_fp8(gs[t], before["grad_output"].scale, "float8_e5m2"),
                                                 before["grad_output"].scale))
        assert state["weight"].amax_history[0] == amax(ws[t])
    # HYBRID: the gradient scale targets E5M2's 57344.
    assert state["grad_output"].scale == np.float32(57344.0) / state["grad_output"].amax_history.max()


def test_state_round_trip_and_bad_recipe():
    recipe = make_recipe(history_len=4)
    state = fp8_delayed_update(fp8_delayed_init(recipe), "input", np.float32(3.3), recipe)
    back = FP8State.from_dict(state.to_dict())
    for role in ("input", "weight", "grad_output"):
        assert back[role].scale.view(np.uint32) == state[role].scale.view(np.uint32)
        assert np.array_equal(back[role].amax_history, state[role].amax_history)
    with pytest.raises(ValueError, match="recipe.amax_algo"):
        fp8_delayed_init(make_recipe(amax_algo="mean"))
    with pytest.raises(ValueError, match="recipe.format"):
        fp8_delayed_init(make_recipe(format="e5m2"))
    with pytest.raises(ValueError, match="fmt"):
        quantize_fp8(np.ones(2), 1.0, "float8")
