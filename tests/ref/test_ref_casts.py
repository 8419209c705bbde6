"""Casts: torch agreement, FP8 saturation, NaN-by-mask equality, idempotence."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dualprec.ref import cast, nan_equal
from dualprec_torch.casts import torch_dtype


def _special_values():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-30, 15, 20000))).astype(np.float32)
    return np.concatenate([x, np.array([0.0, -0.0, 448, 449, 464, 465, 1e6, -1e6, 57344, 61440, 7e4,
                                        np.nan, 1e-10, -1e-10], np.float32)])


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_half_casts_match_torch_bitwise(name):
    x = _special_values()
    ours = cast(x, name)
    theirs = torch.from_numpy(x).to(torch_dtype(name)).view(torch.int16).numpy()
    finite = np.isfinite(x)
    assert np.array_equal(ours.view(np.int16)[finite], theirs[finite])


def test_e4m3_saturates_like_torch_where_ml_dtypes_gives_nan():
    x = _special_values()
    ours = cast(x, "float8_e4m3fn")
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    assert nan_equal(ours, theirs)
    # The plain ml_dtypes cast is what the spec rejects: NaN above 464.
    assert np.isnan(np.float32(465).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert float(cast(np.float32(465), "float8_e4m3fn")) == 448.0
    assert float(cast(np.float32(-np.inf), "float8_e4m3fn")) == -448.0


def test_e5m2_saturates_at_57344_including_inf():
    x = np.array([61440, 1e9, np.inf, -np.inf, 57344, np.nan], np.float32)
    out = cast(x, "float8_e5m2").astype(np.float32)
    assert out[:5].tolist() == [57344, 57344, 57344, -57344, 57344]
    assert np.isnan(out[5])
    # Below the overflow point the cast is torch's RNE cast.
    y = _special_values()
    y = y[np.abs(y) <= 57344]
    theirs = torch.from_numpy(y).to(torch.float8_e5m2).view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2)
    assert nan_equal(cast(y, "float8_e5m2"), theirs)


def test_cast_rejects_unknown_dtype_name():
    with pytest.raises(ValueError, match="dtype_name"):
        cast(np.zeros(2), "float8")


def test_nan_equal_masks_nan_payloads_but_not_signed_zero():
    a = np.array([np.nan, 1.0, 0.0], np.float32)
    b = a.copy()
    b.view(np.uint32)[0] = 0x7FC00001  # another NaN payload
    assert nan_equal(a, b)
    assert not nan_equal(a, np.array([np.nan, 1.0, -0.0], np.float32))
    assert not nan_equal(a, np.array([1.0, 1.0, 0.0], np.float32))
    assert not nan_equal(a, a.astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    st.sampled_from(["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float32"]),
)
def test_cast_is_idempotent(x, name):
    once = cast(x, name)
    assert nan_equal(cast(once, name), once)
    # And casting up to float32 and back changes nothing either.
    assert nan_equal(cast(cast(once, "float32"), name), once)
