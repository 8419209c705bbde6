"""LLM.int8 reference against bitsandbytes' CPU int8 quantization and matmul."""

import numpy as np
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

from dualprec.ref import int8_dequantize_weight, int8_matmul, int8_quantize_weight  # noqa: E402


def _w(shape=(24, 40), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_weight_codes_and_scb_match_bitsandbytes():
    w = _w()
    w[3, :] = 0.5  # exact .5 ties after scaling exercise round-half-even
    codes, scb = int8_quantize_weight(w)
    c_bnb, s_bnb, _ = bnbF.int8_vectorwise_quant(torch.from_numpy(w).half())
    assert np.array_equal(codes, c_bnb.numpy())
    assert np.array_equal(scb, s_bnb.numpy())
    assert codes.dtype == np.int8 and scb.dtype == np.float32
    assert codes[3].tolist() == [127] * 40


def test_half_even_rounding():
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5]], np.float32)
    codes, _ = int8_quantize_weight(w)
    assert codes.tolist() == [[127, 0, 2, 2, 0]]


def test_zero_row_gives_zero_codes():
    w = _w((3, 8))
    w[1] = 0
    codes, scb = int8_quantize_weight(w)
    assert scb[1] == 0 and not codes[1].any()
    assert not int8_dequantize_weight(codes, scb)[1].any()


def test_dequantize_error_bounded_by_half_step():
    w = _w()
    codes, scb = int8_quantize_weight(w)
    err = np.abs(int8_dequantize_weight(codes, scb) - w.astype(np.float16).astype(np.float32))
    assert np.all(err <= scb[:, None] / 127 * 0.5 * (1 + 1e-5))


@pytest.mark.parametrize("outliers", [False, True])
def test_matmul_matches_bitsandbytes_within_fp16_tolerance(outliers):
    """bitsandbytes returns float16 and scales by 6.200124e-05 (1/127**2 = 6.2000124e-05,
    a 1.8e-5 relative slip in its constant) and adds the outlier product in float16 with
    float16-rounded weights; the reference stays float32 with the exact constant. So they
    agree to a few float16 roundings of the terms: |diff| <= 2**-9 * (|x| @ |W|.T)."""
    rng = np.random.default_rng(1)
    w = _w((32, 64))
    x = rng.standard_normal((8, 64)).astype(np.float32)
    if outliers:
        x[:, 5] *= 20
        x[2, 17] = -9.0
    codes, scb = int8_quantize_weight(w)
    ours = int8_matmul(x, codes, scb, threshold=6.0)
    with torch.no_grad():
        theirs = bnb.matmul(torch.from_numpy(x).half(), torch.from_numpy(codes), state=_state(codes, scb)).float().numpy()
    magnitude = np.abs(x.astype(np.float16).astype(np.float32)) @ np.abs(int8_dequantize_weight(codes, scb)).T
    assert np.all(np.abs(ours - theirs) <= 2.0**-9 * magnitude)
    # And the decomposition matters: without it outliers would wreck the int8 rows.
    exact = x.astype(np.float16).astype(np.float32) @ int8_dequantize_weight(codes, scb).T
    assert np.abs(ours - exact).max() < 0.05 * np.abs(exact).max()


def _state(codes, scb):
    st = bnb.MatmulLtState()
    st.CB, st.SCB = torch.from_numpy(codes), torch.from_numpy(scb)
    st.threshold, st.has_fp16_weights, st.is_training = 6.0, False, False
    return st


def test_matmul_threshold_zero_is_plain_int8():
    w, x = _w((4, 16)), _w((3, 16), seed=2) * 10
    codes, scb = int8_quantize_weight(w)
    a = int8_matmul(x, codes, scb, threshold=0.0)
    xq, sx = int8_quantize_weight(x)
    expected = (xq.astype(np.int32) @ codes.astype(np.int32).T).astype(np.float32) * (sx[:, None] * scb) * np.float32(1 / 16129)
    assert np.array_equal(a, expected)


def test_bad_input():
    with pytest.raises(ValueError, match="w must be 2-D"):
        int8_quantize_weight(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="w must be a floating"):
        int8_quantize_weight(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="w contains NaN"):
        int8_quantize_weight(np.array([[1.0, np.nan]], np.float32))
    codes, scb = int8_quantize_weight(_w((4, 8)))
    with pytest.raises(ValueError, match="scb"):
        int8_dequantize_weight(codes, scb[:3])
    with pytest.raises(ValueError, match="x has 7 features"):
        int8_matmul(np.ones((2, 7), np.float32), codes, scb)
