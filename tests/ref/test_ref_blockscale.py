"""dualprec.ref.blockscale against torchao 0.18's CPU implementations, bit for bit.

Inputs are drawn per block from magnitude classes (zeros, normal, tiny/subnormal, huge, inf,
NaN), on shapes whose last dimension is not a multiple of the block (the reference zero-pads;
torchao is given the same zero-padded array).  The one documented difference: torchao's eager
CPU code takes float32 ``log2`` for RCEIL MX exponents and row-wise power-of-two scales, which
rounds to an integer when its argument is within a few ulps above (below) a power of two; the
reference uses the exact value there.  Tests allow exactly that, only there, and count it.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
from torchao.float8 import float8_utils  # noqa: E402
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize as ao_nvfp4_quantize  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale  # noqa: E402

from dualprec.ref import blockscale as bs  # noqa: E402

MODES = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL,
         "ceil": ScaleCalculationMode.CEIL, "even": ScaleCalculationMode.EVEN}
TORCH_FMT = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
CLASSES = ("normal", "normal", "normal", "zero", "tiny", "huge", "inf", "nan", "pow2")
SLOW = settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _data(seed, rows, cols, block, allow_nonfinite=True):
    """rows x cols float32: each block of ``block`` along the last axis from one class."""
    rng = np.random.default_rng(seed)
    nb = -(-cols // block)
    x = np.zeros((rows, nb * block), np.float32)
    for r in range(rows):
        for b in range(nb):
            kind = CLASSES[rng.integers(len(CLASSES) - (0 if allow_nonfinite else 3))] \
                if allow_nonfinite else rng.choice(["normal", "zero", "tiny", "huge", "pow2"])
            v = rng.standard_normal(block).astype(np.float32)
            if kind == "normal":
                v = v * np.float32(10.0 ** rng.integers(-6, 7))
            elif kind == "zero":
                v = np.where(rng.random(block) < 0.5, -0.0, 0.0).astype(np.float32)
            elif kind == "tiny":
                v = v * np.float32(1e-39)  # float32 subnormals
            elif kind == "huge":
                v = v * np.float32(1e37)
            elif kind == "pow2":  # amax exactly a power of two, and neighbours of one
                v[0] = np.float32(2.0 ** rng.integers(-20, 20)) * np.float32(
                    [1.0, 1 + 2**-23, 1 - 2**-24, 448.0, 448.0 * (1 + 2**-23)][rng.integers(5)])
            elif kind == "inf":
                v[rng.integers(block)] = np.inf * rng.choice([-1, 1])
            elif kind == "nan":
                v[rng.integers(block)] = np.nan
            x[r, b * block:(b + 1) * block] = v
    x[:, cols:] = 0.0  # the padding the reference assumes
    return x[:, :cols].copy(), x


def _codes_equal(a, b, fmt):
    """Equal bytes, except that any two NaN encodings count as equal (E5M2 has several
    NaN payloads; which one a cast writes is not part of the format's value)."""
    dt = bs._DT[fmt]
    fa, fb = a.view(dt).astype(np.float32), b.view(dt).astype(np.float32)
    nan = np.isnan(fa)
    return bool(np.array_equal(nan, np.isnan(fb)) and np.array_equal(a[~nan], b[~nan]))


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(1, 150))


# ----------------------------------------------------------------------------- MXFP8
def _near_pow2_above(d):
    """d > 0 within 2**-16 (relative) above a power of two (float32 log2 cannot see the excess)."""
    d = d.astype(np.float64)
    p = 2.0 ** np.floor(np.log2(np.where(d > 0, d, 1.0)))
    return (d > p) & (d < p * (1 + 2.0**-16))


@SLOW
@given(shapes, st.sampled_from(list(MODES)), st.sampled_from(list(TORCH_FMT)))
def test_mx_quantize_matches_torchao_to_mx(case, rounding, fmt):
    seed, rows, cols = case
    x, padded = _data(seed, rows, cols, 32)
    ao_scale, ao_codes = mx.to_mx(torch.from_numpy(padded), TORCH_FMT[fmt], 32, scaling_mode=MODES[rounding])
    ao_scale = ao_scale.view(torch.uint8).numpy()
    ao_codes = ao_codes.view(torch.uint8).numpy()
    scale, codes = bs.mx_quantize(x, rounding, fmt)
    scale = scale.view(np.uint8)
    assert scale.shape == ao_scale.shape and codes.shape == x.shape
    differ = scale != ao_scale
    if differ.any():
        # only RCEIL, only one step, only where amax / elem_max is just above a power of two
        assert rounding == "rceil"
        amax = np.max(np.abs(padded.reshape(rows, -1, 32)), axis=-1)
        d = amax / np.float32(bs._ELEM_MAX[fmt])
        assert np.all(scale[differ].astype(int) == ao_scale[differ].astype(int) + 1)
        assert np.all(_near_pow2_above(d[differ]))
    same = np.repeat(~differ, 32, axis=-1)[:, :cols]
    assert _codes_equal(codes.view(np.uint8)[same], ao_codes[:, :cols][same], fmt)
    # dequantization: torchao's to_dtype
    deq = bs.mx_dequantize(scale.view(bs.E8M0), codes)
    padded_codes = np.pad(codes.view(np.uint8), ((0, 0), (0, (-cols) % 32)))  # code 0 is +0
    ao_deq = mx.to_dtype(torch.from_numpy(padded_codes).view(TORCH_FMT[fmt]),
                         torch.from_numpy(scale.copy()).view(torch.float8_e8m0fnu), TORCH_FMT[fmt], 32,
                         torch.float32).numpy()[:, :cols]
    np.testing.assert_array_equal(deq.view(np.uint32)[~np.isnan(deq)], ao_deq.view(np.uint32)[~np.isnan(deq)])
    assert np.array_equal(np.isnan(deq), np.isnan(ao_deq))


def test_mx_documented_rceil_difference_is_real_and_exact_rule_holds():
    # amax/448 = 2**3 * (1 + 2**-23): exact ceil(log2) is 4; torchao's float32 log2 says 3
    amax = np.float32(448.0 * 8) * np.float32(1 + 2**-23)
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = amax
    ours = bs.mx_quantize(x, "rceil")[0].view(np.uint8)[0, 0]
    assert ours == 127 + 4
    ao = mx.to_mx(torch.from_numpy(x), torch.float8_e4m3fn, 32, scaling_mode=ScaleCalculationMode.RCEIL)[0]
    assert int(ao.view(torch.uint8)[0, 0]) in (127 + 3, 127 + 4)  # 3 with a float32 log2 that rounds
    # the reference's codes never overflow the element range by construction
    assert float(bs.mx_dequantize(*bs.mx_quantize(x, "rceil"))[0, 0]) <= float(amax)


def test_floor_and_rceil_differ_on_random_blocks():
    x = np.random.default_rng(0).standard_normal((256, 32 * 8)).astype(np.float32)
    f = bs.mx_quantize(x, "floor")[0].view(np.uint8)
    r = bs.mx_quantize(x, "rceil")[0].view(np.uint8)
    frac = np.mean(f != r)
    assert 0.05 < frac < 0.5  # FLOOR and RCEIL pick different scales for a sizeable share of blocks


# ----------------------------------------------------------------------------- NVFP4
@SLOW
@given(shapes, st.booleans())
def test_nvfp4_quantize_matches_torchao(case, two_level):
    seed, rows, cols = case
    x, padded = _data(seed, rows, cols, 16)
    pts = None
    if two_level:
        amax = np.max(np.abs(padded))
        pts = per_tensor_amax_to_scale(torch.tensor(amax, dtype=torch.float32))
    ao_s, ao_packed = ao_nvfp4_quantize(torch.from_numpy(padded), 16, pts)
    ts = None if pts is None else np.float32(pts.item())
    if pts is not None:
        assert np.float32(pts.item()).tobytes() == bs.nvfp4_tensor_scale(np.max(np.abs(padded))).tobytes()
    s, codes = bs.nvfp4_quantize(x, ts)
    assert np.array_equal(s.view(np.uint8), ao_s.view(torch.uint8).numpy().reshape(s.shape))
    ao_codes = bs.unpack_fp4(ao_packed.numpy())[:, :cols]
    # elements that dequantize to NaN (a NaN block scale, or an infinite tensor scale) have no
    # meaningful code: torchao's bit-level cast of a NaN depends on the NaN's payload
    deq = bs.nvfp4_dequantize(s, codes, ts)
    ok = ~np.isnan(deq)
    assert np.array_equal(np.isnan(deq), np.isnan(bs.nvfp4_dequantize(s, ao_codes, ts)))
    assert np.array_equal(codes[ok], ao_codes[ok])
    if np.isfinite(padded).all() and (ts is None or ts > 0):  # ts 0: all zeros, 0/0 block scales
        assert ok.all()
    padded_codes = bs.unpack_fp4(ao_packed.numpy())
    assert np.array_equal(bs.pack_fp4(padded_codes), ao_packed.numpy())


def test_nvfp4_dequantize_matches_torchao_tensor():
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    x, _ = _data(7, 4, 64, 16, allow_nonfinite=False)
    for pts in (None, per_tensor_amax_to_scale(torch.tensor(np.max(np.abs(x)), dtype=torch.float32))):
        t = NVFP4Tensor.to_nvfp4(torch.from_numpy(x), per_tensor_scale=pts)
        ts = None if pts is None else np.float32(pts.item())
        s, c = bs.nvfp4_quantize(x, ts)
        ours = bs.nvfp4_dequantize(s, c, ts)
        theirs = t.dequantize(torch.float32).numpy()
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_two_level_keeps_small_tensors_that_one_level_flushes():
    x = (np.random.default_rng(1).standard_normal((8, 64)) * 1e-6).astype(np.float32)
    one = bs.nvfp4_dequantize(*bs.nvfp4_quantize(x))
    ts = bs.nvfp4_tensor_scale(np.max(np.abs(x)))
    two = bs.nvfp4_dequantize(*bs.nvfp4_quantize(x, ts), ts)
    assert np.all(one == 0)
    rel = np.linalg.norm(two - x) / np.linalg.norm(x)
    assert rel < 0.15


def test_stochastic_rounding_is_unbiased_and_seeded():
    v = np.full((1, 200_000), 0.7, np.float32)  # between 0.5 and 1.0: up with probability 0.4
    u = bs.sr_uniform24(3, 0, v.shape)
    codes = bs.e2m1_codes(v, u24=u)
    vals = bs._e2m1_value(codes)
    assert set(np.unique(vals)) == {0.5, 1.0}
    assert abs(vals.mean() - 0.7) < 0.003
    assert np.array_equal(u, bs.sr_uniform24(3, 0, v.shape))
    assert not np.array_equal(u, bs.sr_uniform24(4, 0, v.shape))
    assert not np.array_equal(u, bs.sr_uniform24(3, 1, v.shape))
    grid = np.array([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -6.0]], np.float32)  # on the grid: exact
    assert np.array_equal(bs._e2m1_value(bs.e2m1_codes(grid, u24=bs.sr_uniform24(0, 0, grid.shape))), grid)


def test_hadamard_is_orthogonal_and_preserves_the_wgrad_product():
    rng = np.random.default_rng(2)
    g, x = rng.standard_normal((37, 5)).astype(np.float32), rng.standard_normal((37, 3)).astype(np.float32)
    signs = bs.rht_signs(11)
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    hg, hx = bs.hadamard16(g, signs), bs.hadamard16(x, signs)
    assert hg.shape == (48, 5)
    np.testing.assert_allclose(hg.T.astype(np.float64) @ hx, g.T.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)
    h = np.array([[(-1) ** bin(i & j).count("1") for j in range(16)] for i in range(16)], np.float64) / 4
    e = np.eye(16, dtype=np.float32)
    np.testing.assert_allclose(bs.hadamard16(e, signs), h @ np.diag(signs), atol=0)


def test_2d_weight_tiles_share_codes_with_the_transpose():
    w = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)
    ts = bs.nvfp4_tensor_scale(np.max(np.abs(w)))
    s, c = bs.nvfp4_quantize_2d(w, ts)
    st_, ct = bs.nvfp4_quantize_2d(w.T, ts)
    assert s.shape == (3, 2) and np.array_equal(s.view(np.uint8).T, st_.view(np.uint8))
    assert np.array_equal(c.T, ct)


# ----------------------------------------------------------------------------- row-wise
def _near_pow2_below(s):
    s = s.astype(np.float64)
    p = 2.0 ** np.ceil(np.log2(np.where(s > 0, s, 1.0)))
    return (s < p) & (s > p * (1 - 2.0**-16))


@SLOW
@given(shapes, st.sampled_from([0, -1, None]))
def test_rowwise_scales_and_codes_match_torchao(case, axis):
    seed, rows, cols = case
    x, _ = _data(seed, rows, cols, 8)
    t = torch.from_numpy(x)
    from torchao.float8.config import ScalingGranularity

    ao_s = float8_utils.tensor_to_scale(
        t, torch.float8_e4m3fn,
        scaling_granularity=ScalingGranularity.TENSORWISE if axis is None else ScalingGranularity.AXISWISE,
        axiswise_dim=axis, round_scales_to_power_of_2=True).numpy()
    ao_q = float8_utils.to_fp8_saturated(t.to(torch.float32) * torch.from_numpy(ao_s), torch.float8_e4m3fn)
    s = bs.rowwise_scale(x, axis)
    q = bs.quantize_scaled(x, s)
    assert s.shape == ao_s.shape
    differ = ~((s == ao_s) | (np.isnan(s) & np.isnan(ao_s)))
    if differ.any():
        raw = bs.amax_to_scale(np.max(np.abs(x), axis=axis, keepdims=axis is not None), pow2=False)
        assert np.all(ao_s[differ] == 2 * s[differ]) and np.all(_near_pow2_below(np.broadcast_to(raw, s.shape)[differ]))
    same = np.broadcast_to(~differ, x.shape)
    assert _codes_equal(q.view(np.uint8)[same], ao_q.view(torch.uint8).numpy()[same], "float8_e4m3fn")


def test_rowwise_linear_matches_torchao_float8_linear():
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    w = (rng.standard_normal((48, 64)) * 0.1).astype(np.float32)
    g = rng.standard_normal((32, 48)).astype(np.float32)
    for name, hp in (("rowwise", False), ("rowwise_with_gw_hp", True)):
        lin = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
        lin[0].weight.data = torch.from_numpy(w.copy())
        cfg = Float8LinearConfig.from_recipe_name(name)
        cfg = Float8LinearConfig(**{**cfg.__dict__, "emulate": True})
        convert_to_float8_training(lin, config=cfg)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        y = lin(xt)
        y.backward(torch.from_numpy(g))
        ref = bs.rowwise_linear(x, w, g, with_gw_hp=hp)
        for ours, theirs in ((ref["y"], y.detach().numpy()), (ref["dx"], xt.grad.numpy()),
                             (ref["dw"], lin[0].weight.grad.numpy())):
            scale = np.max(np.abs(ours))
            np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * scale)
