"""NF4/FP4 reference against bitsandbytes 0.50.2 on CPU, its quirks, and bad input.

Double quantization is bit-identical too: the offset replays torch's float32 CPU mean
(one thread; see test_offset_is_torch_float32_mean for k threads) and the nested 8-bit
codes replay bitsandbytes' CPU grid-lookup kernel, which is not always the nearest code
(test_bnb_8bit_cpu_kernel_is_not_nearest)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

bnbF = pytest.importorskip("bitsandbytes.functional")

from dualprec.dtypes import numpy_dtype  # noqa: E402
from dualprec.ref import QuantState4bit, dequantize_4bit, quantize_4bit  # noqa: E402
from dualprec.ref.fourbit import BLOCKSIZES, CODEBOOKS, DYNAMIC_MAP, _mean_float32, _quantize_8bit  # noqa: E402
from dualprec_torch.casts import torch_dtype  # noqa: E402


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, shape))
    return x.astype(np.float32).astype(numpy_dtype(dtype))


def _bnb(x, qt, bs, dq=False):
    xt = torch.from_numpy(x.astype(np.float32)).to(torch_dtype(x.dtype.name))
    return bnbF.quantize_4bit(xt, blocksize=bs, quant_type=qt, compress_statistics=dq)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _bits_any_zero(a):
    """Bits with -0.0 read as +0.0: FP4's code 8 is -0.0 in the reference and in
    bitsandbytes' sign-decoding kernels (scalar CPU, CUDA), +0.0 in its table-reading paths
    (AVX512 CPU, the generic fallback for odd lengths). test_fp4_code_8_is_negative_zero
    checks the sign against the former."""
    a = np.asarray(a, np.float32)
    return _bits(np.where(a == 0, np.float32(0), a))


def test_codebooks_and_dynamic_map_are_bitsandbytes():
    for qt, code in CODEBOOKS.items():
        assert np.array_equal(_bits(code), _bits(bnbF.get_4bit_type(qt, device="cpu").numpy()))
    assert np.array_equal(_bits(DYNAMIC_MAP), _bits(bnbF.create_dynamic_map(signed=True).numpy()))


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_codes_and_absmax_bit_identical(qt, bs, dtype):
    # Odd count, partial last block, an all-zero block, tiny and huge values.
    x = _data((3 * bs + 37,), dtype, seed=bs)
    x[bs: 2 * bs] = 0
    x[:5] = np.array([1e-30, -1e-30, 6e4, -6e4, 0], np.float32).astype(x.dtype)
    q, s = _bnb(x, qt, bs)
    packed, state = quantize_4bit(x, qt, bs)
    assert packed.shape == tuple(q.shape)
    assert np.array_equal(packed, q.numpy())
    assert np.array_equal(_bits(state.absmax), _bits(s.absmax.numpy()))
    # Dequantized values equal bitsandbytes' generic (non-AVX512) dequantize, bit for bit.
    ours = dequantize_4bit(packed, state)
    theirs = bnbF.dequantize_4bit(q, s).float().numpy().reshape(-1)  # 1-D shape: scalar kernel path
    assert np.array_equal(_bits_any_zero(ours.astype(np.float32)), _bits_any_zero(theirs))


def _dq_data(bs, dtype, seed):
    """A tensor whose absmax vector spans two nested blocks (the second partial): odd
    count, a partial last 4-bit block, runs of all-zero 4-bit blocks, tiny and huge
    values, and one magnitude scale per 4-bit block so (absmax - mean) covers the map."""
    rng = np.random.default_rng(seed)
    nblocks = 256 + int(rng.integers(1, 256))
    n = nblocks * bs - int(rng.integers(1, bs)) | 1  # odd, last block partial
    span = 6 if dtype == "float16" else 12  # float16 tops out at 65504
    scale = np.repeat(np.exp(rng.uniform(-span, span, nblocks)), bs)[:n]
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    z = int(rng.integers(0, nblocks - 10))
    x[z * bs: (z + 3) * bs] = 0  # three all-zero 4-bit blocks
    x[:4] = [1e-30, -3e-30, 6e4, -6e4]
    return x.astype(numpy_dtype(dtype))


def _assert_dq_state_is_bnb(x, qt, bs):
    q, s = _bnb(x, qt, bs, dq=True)
    packed, state = quantize_4bit(x, qt, bs, double_quant=True)
    assert np.array_equal(packed, q.numpy())
    assert _bits(state.offset) == _bits(s.offset.item())
    assert np.array_equal(state.absmax, s.absmax.numpy())
    assert np.array_equal(_bits(state.nested_absmax), _bits(s.state2.absmax.numpy()))
    assert np.array_equal(_bits(state.nested_code), _bits(s.state2.code.numpy()))
    # Same state, so the same dequantized bits (bnb's generic path via a 1-D shape).
    s.shape = torch.Size([x.size])
    theirs = bnbF.dequantize_4bit(q, s).float().numpy().reshape(-1)
    assert np.array_equal(_bits_any_zero(dequantize_4bit(packed, state).astype(np.float32).reshape(-1)),
                          _bits_any_zero(theirs))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_double_quant_state_bit_identical(qt, bs, dtype, seed):
    """Offset (torch's float32 mean), nested 8-bit codes and nested absmax all equal
    bitsandbytes' bit for bit. (Fewer than 32768 blocks: torch's mean is thread-free.)"""
    _assert_dq_state_is_bnb(_dq_data(bs, dtype, seed * 1000 + bs), qt, bs)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("x", [
    np.zeros(1000, np.float32),                                      # absmax all 0: nested block all zero
    np.ones(64 * 300, np.float32),                                   # absmax constant: absmax - mean all 0
    np.tile(np.float32([1e-38, -1e-38]), 64 * 5),                    # tiny
    np.float32([3e35, -1.0, 1e-45] * 700),                           # huge and subnormal
    np.arange(1, 64 * 513, dtype=np.float32),                        # smooth ramp, 3 nested blocks
], ids=["zeros", "constant", "tiny", "huge", "ramp"])
def test_double_quant_edge_tensors_bit_identical(qt, x):
    _assert_dq_state_is_bnb(x, qt, 64)


def test_double_quant_many_blocks_single_thread():
    """40000 blocks: torch's mean splits the sum across threads from 32768 values; with
    one torch thread the default reference offset is bitsandbytes' exactly."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _assert_dq_state_is_bnb(_data((40000 * 32 + 7,), "float32", seed=9), "nf4", 32)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1023, 4097, 32767, 32768, 32769, 65537, 300001])
def test_offset_is_torch_float32_mean(n, threads):
    """The offset replicates torch's CPU cascade sum (8 float lanes, 4-way ILP, 4 levels)
    and, from 32768 values, its split into one partial sum per OpenMP thread."""
    rng = np.random.default_rng(n)
    v = (np.abs(rng.standard_normal(n)) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        theirs = torch.from_numpy(v).mean().item()
    finally:
        torch.set_num_threads(old)
    assert _bits(_mean_float32(v, threads=threads)) == _bits(theirs)
    # Differently threaded, the result may differ, but by at most a few ulps.
    assert abs(int(_bits(_mean_float32(v))) - int(_bits(theirs))) <= 4


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 1200),
               elements=st.floats(-3.0000000054977558e38, 3.0000000054977558e38, width=32) | st.sampled_from([0.0, -0.0, 1e-45, 1.0])),
)
def test_8bit_blockwise_is_bnb_cpu_kernel(x):
    """Nested quantizer vs bitsandbytes' CPU quantize_blockwise (blocks of 256), incl. NaN/inf."""
    q, s = bnbF.quantize_blockwise(torch.from_numpy(x.copy()), blocksize=256)
    codes, absmax = _quantize_8bit(x)
    assert np.array_equal(codes, q.numpy())
    assert np.array_equal(_bits(absmax), _bits(s.absmax.numpy()))


def test_8bit_grid_boundaries_are_bnb_cpu_kernel():
    """Every grid cell edge: values just below, at and above ((k - 0.5) / 65535) * 2 - 1,
    scaled by several absmax values, in full and partial blocks."""
    k = np.arange(1, 65536)
    v0 = (2 * (k - 0.5) / 65535 - 1).astype(np.float32)
    vals = np.concatenate([np.nextafter(v0, np.float32(-2)), v0, np.nextafter(v0, np.float32(2))])
    vals = vals[np.abs(vals) <= 1]
    np.random.default_rng(0).shuffle(vals)
    for am in [1.0, 3.0, 0.7, 1e-30, 12345.678]:
        body = (vals[: vals.size - vals.size % 255] * np.float32(am)).astype(np.float32).reshape(-1, 255)
        x = np.concatenate([np.full((body.shape[0], 1), am, np.float32), body], 1).reshape(-1)
        x = np.concatenate([x, x[:1003]])
        q, s = bnbF.quantize_blockwise(torch.from_numpy(x), blocksize=256)
        codes, absmax = _quantize_8bit(x)
        assert np.array_equal(codes, q.numpy())
        assert np.array_equal(_bits(absmax), _bits(s.absmax.numpy()))


def test_bnb_8bit_cpu_kernel_is_not_nearest():
    """Quirk kept for bit-identity: bitsandbytes' CPU 8-bit kernel reads codes from a
    65536-point grid (step 2/65535), so 0.0 gets code 131 (2.125e-5), not the exact 0."""
    x = np.zeros(256, np.float32)
    x[0] = 1.0
    codes, _ = _quantize_8bit(x)
    q, _ = bnbF.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    assert codes[1] == q[1].item() == 131
    assert DYNAMIC_MAP[codes[1]] == pytest.approx(2.125e-5)


def test_fp4_signed_zero_order_quirk():
    """Quirk kept for bit-identity: in FP4 tiny positives get the "-0" code (8) and tiny
    negatives the "+0" code (0)."""
    x = np.array([1.0, 1e-4, -1e-4, 0.0], np.float32)
    packed, state = quantize_4bit(x, "fp4", 32)
    assert packed.reshape(-1).tolist() == [(3 << 4) | 8, (0 << 4) | 0]
    assert np.array_equal(packed, _bnb(x, "fp4", 32)[0].numpy())
    out = dequantize_4bit(packed, state)
    assert out[1] == 0.0 and np.signbit(out[1]) and not np.signbit(out[2])


def test_fp4_code_8_is_negative_zero():
    """bitsandbytes decodes FP4 from the sign bit: code 8 dequantizes to -0.0 (its scalar CPU
    kernel, taken by rows whose length is not a multiple of 16; its CUDA kernel too), while
    its code table, which checkpoints store as quant_map, holds +0.0 (so does CODEBOOKS)."""
    x = _data((30, 50), "float32", seed=8) * np.float32(1e-3)
    x.reshape(-1)[::9] = 1.0
    q, s = _bnb(x, "fp4", 64)
    packed, state = quantize_4bit(x, "fp4", 64)
    codes = np.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], -1).reshape(-1)[: x.size]
    assert (codes == 8).sum() > 50
    ours, theirs = dequantize_4bit(packed, state), bnbF.dequantize_4bit(q, s).numpy()
    assert np.array_equal(_bits(ours), _bits(theirs))
    assert np.signbit(ours.reshape(-1)[codes == 8]).all()
    assert not np.signbit(CODEBOOKS["fp4"][8]) and not np.signbit(s.code.numpy()[8])


def test_all_zero_partial_block_stores_1e38_like_bitsandbytes():
    """Quirk kept: bitsandbytes clamps only the partial block's stored absmax to 1e-38."""
    packed, state = quantize_4bit(np.zeros(100, np.float32), "nf4", 64)
    assert state.absmax[0] == 0 and state.absmax[1] == np.float32(1e-38)
    assert not dequantize_4bit(packed, state).any()


def test_bnb_cpu_avx512_dequant_bug_for_unaligned_rows():
    """bitsandbytes' fused CPU dequantize is wrong when the last dim is a multiple of 16
    but not of the block size (observed on AVX512 machines); the reference is not."""
    x = _data((3, 48), "float32", seed=5)
    q, s = _bnb(x, "nf4", 32)
    packed, state = quantize_4bit(x, "nf4", 32)
    ours = dequantize_4bit(packed, state)
    fused = bnbF.dequantize_4bit(q, s).numpy()
    s.shape = torch.Size([x.size])
    generic = bnbF.dequantize_4bit(q, s).numpy().reshape(x.shape)
    assert np.array_equal(ours, generic)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not np.array_equal(fused, generic), "bug fixed upstream? then drop this quirk note"


def test_nonfinite_raises_by_default_and_propagates_like_bnb_on_request():
    x = _data((130,), "float32")
    x[3], x[70] = np.nan, np.inf
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        quantize_4bit(x)
    packed, state = quantize_4bit(x, nonfinite="propagate")
    q, s = _bnb(x, "nf4", 64)
    assert np.array_equal(packed, q.numpy())
    assert np.array_equal(_bits(state.absmax), _bits(s.absmax.numpy()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(blocksize=48), "blocksize"), (dict(blocksize=8192), "blocksize"), (dict(blocksize=True), "blocksize"),
    (dict(quant_type="int4"), "quant_type"), (dict(nonfinite="skip"), "nonfinite"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(np.ones(64, np.float32), **kwargs)


@pytest.mark.parametrize("x", [np.ones(4, np.int32), np.ones(4, np.float64), np.ones(4, bool), np.ones(0, np.float32)])
def test_bad_input_names_x(x):
    with pytest.raises(ValueError, match="x "):
        quantize_4bit(x)


def test_dequantize_shape_mismatches_name_the_argument():
    packed, state = quantize_4bit(np.ones((4, 64), np.float32), double_quant=True)
    with pytest.raises(ValueError, match="packed"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError, match="packed"):
        dequantize_4bit(packed.astype(np.int8), state)
    d = state.to_dict()
    d["shape"] = [5, 64]
    with pytest.raises(ValueError, match="state.absmax"):
        QuantState4bit.from_dict(d)
    d = state.to_dict()
    d["nested_absmax"] = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="state.nested_absmax"):
        QuantState4bit.from_dict(d)


@pytest.mark.parametrize("dq", [False, True])
def test_state_round_trips(dq):
    x = _data((5, 70), "bfloat16")
    packed, state = quantize_4bit(x, "fp4", 128, double_quant=dq)
    back = QuantState4bit.from_dict(state.to_dict())
    assert np.array_equal(dequantize_4bit(packed, back).view(np.uint16), dequantize_4bit(packed, state).view(np.uint16))
    assert back.shape == (5, 70) and back.dtype == "bfloat16"


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 300),
               elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)),
    st.sampled_from(["nf4", "fp4"]),
    st.sampled_from([32, 64, 128]),
)
def test_round_trip_error_at_most_half_a_code_step(x, qt, bs):
    packed, state = quantize_4bit(x, qt, bs)
    out = dequantize_4bit(packed, state).astype(np.float64)
    code = np.sort(CODEBOOKS[qt].astype(np.float64))
    half_step = np.diff(code).max() / 2
    absmax = np.repeat(state.absmax.astype(np.float64), bs)[: x.size]
    bound = half_step * absmax * (1 + 1e-6) + 1e-30
    assert np.all(np.abs(out - x.astype(np.float64)) <= bound)
