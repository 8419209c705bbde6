"""NF4 / FP4 blockwise 4-bit quantization, bit-compatible with bitsandbytes.

Layout (bitsandbytes' own): the tensor is flattened row-major and cut into blocks of
`blocksize` values; each block keeps its float32 absmax; each value becomes the index of
the nearest of 16 codebook values after dividing by the absmax (an exact tie goes to the
lower code); two indices share a byte, the even element in the high nibble, and an odd
count is padded with the code of 0.0. Double quantization stores the absmax vector as
(absmax - mean) quantized with the signed 8-bit dynamic map in blocks of 256; the mean is
torch's float32 CPU mean and the 8-bit codes are those of bitsandbytes' CPU 8-bit kernel
(a 65536-point grid lookup, not always the nearest code), both replayed bit for bit, since
both end up in checkpoints.

Where bitsandbytes 0.50.2's CPU 4-bit dequantize deviates from the math, the reference
keeps the math and tests/ref/test_ref_fourbit_bnb.py shows the deviation.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .casts import dtype_name as _dtype_name
from .casts import dtype_of

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
INPUT_DTYPES = ("float32", "bfloat16", "float16")
NESTED_BLOCKSIZE = 256
# bitsandbytes clamps the divisor so an all-zero block does not divide 0 by 0.
_TINY = np.float32(1e-38)

NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, normalised by its max 12
# in float32. Index 8 is the "negative zero" pattern. bitsandbytes' code table (the
# `quant_map` its checkpoints hold) stores +0.0 there, and so does CODEBOOKS, which is
# exported byte for byte.
FP4_CODE = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
    / np.float32(12.0)
)
CODEBOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}
# The values dequantization gives.  bitsandbytes' dequantize kernels decode FP4 from its
# sign bit (its CUDA kernel, and its scalar CPU kernel, which every row whose length is not
# a multiple of 16 takes), so code 8 comes out as -0.0, not as the table's +0.0; its AVX512
# CPU path and its generic torch fallback read the table and give +0.0.  The reference
# follows the sign bit.
_FP4_VALUES = FP4_CODE.copy()
_FP4_VALUES[8] = np.float32(-0.0)
DEQUANT_VALUES = {"nf4": NF4_CODE, "fp4": _FP4_VALUES}

# Codebook indices in ascending value order. For FP4 the two zeros tie; bitsandbytes puts
# index 0 before index 8, so values in (-step/2, 0] get code 0 and values in (0, step/2]
# get code 8 (which dequantizes to -0.0, see DEQUANT_VALUES). Codes are stored, so this order is kept.
_SORT_ORDER = {
    "nf4": np.arange(16, dtype=np.uint8),
    "fp4": np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8),
}


def _midpoints(quant_type: str) -> np.ndarray:
    sorted_code = CODEBOOKS[quant_type][_SORT_ORDER[quant_type]]
    # float32 midpoints, as bitsandbytes computes them; a value equal to one goes lower.
    return (sorted_code[:-1] + sorted_code[1:]) / np.float32(2)


_MIDPOINTS = {q: _midpoints(q) for q in QUANT_TYPES}

# bitsandbytes.functional.create_dynamic_map(signed=True), as float32 bit patterns. It is
# stored rather than recomputed because bitsandbytes builds it with torch.linspace, whose
# float32 rounding NumPy's linspace does not reproduce; a test pins it to bitsandbytes.
_DYNAMIC_MAP_BITS = """
bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd
bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 bf44999a bf410000 bf3d6666 bf39cccd
bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd
bf123334 bf0e999a bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a
bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 bea2cccc be9b999a
be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333
be18cccd be0a6666 bdf80000 bddb3334 bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8
bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d
bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15
bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 bc1f3b64 bc160418 bc0ccccd bc039581
bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d
baf1a9fc baa7ef9d ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b
b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 3513a3b7 365a1a94
370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1
3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374
3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148
3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85
3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d
3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7
3dc9eb85 3ddb3334 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd
3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 3eb13333 3eb86666
3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333
3f03cccc 3f076666 3f0b0000 3f0e999a 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334
3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333
3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000"""
DYNAMIC_MAP = np.array([int(h, 16) for h in _DYNAMIC_MAP_BITS.split()], np.uint32).view(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantState4bit:
    """Everything `dequantize_4bit` needs besides the packed codes.

    `absmax` is the float32 absmax per block, or, when double-quantized, the uint8 codes
    of (absmax - offset) under `nested_code`, with `nested_absmax` (float32, one per 256
    blocks) and `offset` (torch's float32 mean of the absmax vector).
    """

    quant_type: str
    blocksize: int
    shape: tuple
    dtype: str
    absmax: np.ndarray
    nested_absmax: Optional[np.ndarray] = None
    offset: Optional[np.float32] = None
    nested_code: Optional[np.ndarray] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def code(self) -> np.ndarray:
        return CODEBOOKS[self.quant_type]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self) -> np.ndarray:
        """The float32 absmax per block (dequantizing the nested state if any)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_8bit(self.absmax, self.nested_absmax, self.nested_code) + self.offset

    def _nested_parts(self) -> tuple[np.ndarray, np.float32, np.ndarray]:
        """(nested_absmax, offset, nested_code) of a double-quantized state."""
        if self.nested_absmax is None or self.offset is None or self.nested_code is None:
            raise ValueError("state.offset and a 256-entry state.nested_code are required with state.nested_absmax")
        return self.nested_absmax, self.offset, self.nested_code

    def to_dict(self) -> dict:
        d = {
            "quant_type": self.quant_type,
            "blocksize": int(self.blocksize),
            "shape": [int(s) for s in self.shape],
            "dtype": self.dtype,
            "absmax": np.array(self.absmax),
        }
        if self.double_quant:
            nested_absmax, offset, nested_code = self._nested_parts()
            d.update(
                nested_absmax=np.array(nested_absmax),
                offset=float(offset),
                nested_code=np.array(nested_code),
                nested_blocksize=int(self.nested_blocksize),
            )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantState4bit":
        nested = "nested_absmax" in d
        state = cls(
            quant_type=d["quant_type"],
            blocksize=int(d["blocksize"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=d["dtype"],
            absmax=np.asarray(d["absmax"], dtype=np.uint8 if nested else np.float32),
            nested_absmax=np.asarray(d["nested_absmax"], np.float32) if nested else None,
            offset=np.float32(d["offset"]) if nested else None,
            nested_code=np.asarray(d["nested_code"], np.float32) if nested else None,
            nested_blocksize=int(d.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )
        _check_state(state)
        return state


def _check_options(quant_type: str, blocksize) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _check_input(x) -> np.ndarray:
    x = np.asarray(x)
    try:
        name = _dtype_name(x.dtype)
    except ValueError:
        name = None
    if name not in INPUT_DTYPES:
        raise ValueError(f"x must be a float32, bfloat16 or float16 array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError("x must have at least one element")
    return x


# Values per chunk: keeps the temporaries of one chunk in cache (a ~2x speed-up over
# whole-array passes on large tensors) while the loop stays one iteration per chunk.
_CHUNK = 1 << 16


def _codes_full_blocks(body: np.ndarray, quant_type: str):
    """absmax and sorted-code indices of whole blocks (rows of `body`), chunk by chunk."""
    nblocks, blocksize = body.shape
    absmax = np.empty(nblocks, np.float32)
    idx = np.empty(body.size, np.uint8)
    rows = max(1, _CHUNK // blocksize)
    mids = _MIDPOINTS[quant_type]
    for r0 in range(0, nblocks, rows):
        chunk = body[r0 : r0 + rows]
        am = np.abs(chunk).max(axis=1)
        absmax[r0 : r0 + rows] = am
        # Full blocks multiply by the float32 reciprocal (of the absmax clamped to 1e-38),
        # exactly as bitsandbytes does; the partial last block divides instead.
        scaled = chunk * (np.float32(1.0) / np.maximum(am, _TINY))[:, None]
        np.clip(scaled, -1.0, 1.0, out=scaled)
        # side="left" counts midpoints strictly below the value: an exact tie goes lower.
        # NaN sorts after every midpoint, giving the top code, as in bitsandbytes.
        idx[r0 * blocksize : (r0 + chunk.shape[0]) * blocksize] = np.searchsorted(mids, scaled.reshape(-1))
    return absmax, idx


def _codes(flat: np.ndarray, quant_type: str, blocksize: int):
    """Per-block absmax and codebook indices (padded to an even count with the code of 0)."""
    n = flat.size
    full = n - n % blocksize
    absmax, idx = _codes_full_blocks(flat[:full].reshape(-1, blocksize), quant_type)
    if full < n:
        # bitsandbytes stores the clamped absmax of a partial block: 1e-38 when all zero.
        tail_absmax = np.float32(max(np.abs(flat[full:]).max(), _TINY))
        scaled = np.clip(flat[full:] / tail_absmax, -1.0, 1.0)
        absmax = np.append(absmax, tail_absmax)
        idx = np.concatenate([idx, np.searchsorted(_MIDPOINTS[quant_type], scaled).astype(np.uint8)])
    if n % 2:
        idx = np.append(idx, np.uint8(np.searchsorted(_MIDPOINTS[quant_type], np.float32(0))))
    return absmax.astype(np.float32), _SORT_ORDER[quant_type][idx]


def _pack(codes: np.ndarray) -> np.ndarray:
    if codes.size % 2:
        raise AssertionError("codes must be padded to an even count")
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


def quantize_4bit(
    x,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    nonfinite: str = "raise",
):
    """Quantize a float32/bfloat16/float16 array to packed NF4 or FP4 codes.

    Returns `(packed, state)`: `packed` is uint8 of shape (ceil(n/2), 1) like
    bitsandbytes' `quantize_4bit`, `state` a `QuantState4bit`.

    NaN or inf in `x` raise `ValueError` (`nonfinite="raise"`, the default): a single one
    poisons its whole block (absmax NaN or inf), and with double quantization every block.
    `nonfinite="propagate"` reproduces bitsandbytes instead: such a block gets absmax
    NaN/inf and codes that dequantize to NaN/0.
    """
    _check_options(quant_type, blocksize)
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    x = _check_input(x)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if nonfinite == "raise" and not np.isfinite(flat).all():
        raise ValueError("x contains NaN or inf; pass nonfinite='propagate' to quantize it anyway")
    absmax, codes = _codes(flat, quant_type, blocksize)
    packed = _pack(codes)
    shape, dtype = tuple(x.shape), _dtype_name(x.dtype)
    if not double_quant:
        return packed, QuantState4bit(quant_type, blocksize, shape, dtype, absmax=absmax)
    offset = _mean_float32(absmax)
    codes, nested_absmax = _quantize_8bit(absmax - offset)
    state = QuantState4bit(
        quant_type, blocksize, shape, dtype,
        absmax=codes, nested_absmax=nested_absmax, offset=offset, nested_code=DYNAMIC_MAP.copy(),
    )
    return packed, state


# torch's CPU float32 sum (which bitsandbytes' offset `absmax.mean()` uses) is a cascade
# sum; its order is replicated below. Measured on torch 2.13 x86 (AVX2 and AVX512 builds
# alike) the sum kernel runs on 8-lane float vectors; 1-D inputs of at least 32768 values
# are split across the OpenMP threads, so the result then depends on the thread count.
TORCH_SUM_LANES = 8
_TORCH_GRAIN_SIZE = 32768


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0, starting from 0 (as a C loop adds)."""
    acc = np.zeros(a.shape[1:], np.float32)
    for row in a:
        acc = acc + row
    return acc


def _grouped_seq_sums(a: np.ndarray, step: int):
    """Sequential sums of whole groups of `step` rows, and of the leftover rows."""
    groups = a.shape[0] // step
    whole = a[: groups * step].reshape((groups, step) + a.shape[1:])
    totals = _seq_sum(np.moveaxis(whole, 1, 0)) if groups else np.zeros((0,) + a.shape[1:], np.float32)
    return totals, _seq_sum(a[groups * step :])


def _cascade_rows(a: np.ndarray) -> np.ndarray:
    """torch's multi_row_sum: 4 accumulator levels, each flushed every 2**p additions."""
    size = a.shape[0]
    ceil_log2 = 1 if size <= 2 else int(size - 1).bit_length()
    step = 1 << max(4, ceil_log2 // 4)
    chunks, acc0 = _grouped_seq_sums(a, step)
    level1, acc1 = _grouped_seq_sums(chunks, step)
    level2, acc2 = _grouped_seq_sums(level1, step)
    acc3 = _seq_sum(level2)
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(a: np.ndarray) -> np.ndarray:
    """torch's row_sum: 4 interleaved cascades, leftovers into the first, then combined."""
    n4 = a.shape[0] // 4
    parts = _cascade_rows(a[: n4 * 4].reshape((n4, 4) + a.shape[1:]))
    acc = parts[0]
    for row in a[n4 * 4 :]:
        acc = acc + row
    for k in range(1, 4):
        acc = acc + parts[k]
    return acc


def _torch_inner_sum(x: np.ndarray, lanes: int) -> np.float32:
    if x.size < lanes:
        return np.float32(_row_sum(x))
    nvec = x.size // lanes
    vec = _row_sum(x[: nvec * lanes].reshape(nvec, lanes))
    acc = np.float32(0)
    for v in x[nvec * lanes :]:  # scalar tail first, then the vector lanes in order
        acc = np.float32(acc + v)
    for v in vec:
        acc = np.float32(acc + v)
    return acc


def _mean_float32(values: np.ndarray, threads: int = 1, lanes: int = TORCH_SUM_LANES) -> np.float32:
    """torch.mean of a 1-D float32 CPU tensor, bit for bit: cascade sum / n in float32.

    From 32768 values on torch splits the sum over `threads` OpenMP threads (contiguous
    chunks of ceil(n/threads)), each into its own partial, and then sums the partials;
    pass the thread count bitsandbytes ran with. Below 32768 values the thread count does
    not matter.
    """
    x = np.ascontiguousarray(values, np.float32).reshape(-1)
    n = x.size
    with np.errstate(over="ignore", invalid="ignore"):
        if n < _TORCH_GRAIN_SIZE or threads <= 1:
            total = np.float32(0) + _torch_inner_sum(x, lanes)
        else:
            used = min(threads, -(-n // _TORCH_GRAIN_SIZE))
            chunk = -(-n // used)
            partials = np.zeros(threads, np.float32)
            for t in range(used):
                partials[t] = np.float32(0) + _torch_inner_sum(x[t * chunk : (t + 1) * chunk], lanes)
            total = np.float32(0) + _torch_inner_sum(partials, lanes)
        return np.float32(total / np.float32(n))


# bitsandbytes' CPU 8-bit blockwise quantizer does not search the codebook: it maps the
# normalised value to one of 65536 grid points and reads the code from a table built once
# per codebook. Grid point i stands for the float32 value -1 + (2*i)/65535, and its code is
# the number of float32 midpoints 0.5*(code[j] + code[j+1]) strictly below that value.
_LUT_SIZE = 65536
_LUTS: dict = {}


def _lookup_table(code: np.ndarray) -> np.ndarray:
    code = np.ascontiguousarray(code, np.float32)
    key = code.tobytes()
    lut = _LUTS.get(key)
    if lut is None:
        mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
        grid = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
        lut = np.searchsorted(mids, grid, side="left").astype(np.uint8)
        _LUTS[key] = lut
    return lut


def _quantize_8bit(values: np.ndarray, code: np.ndarray = DYNAMIC_MAP, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise 8-bit quantization exactly as bitsandbytes 0.50.2 does it on CPU.

    Per block: absmax = max |x| in float32 (NaN ignored); an all-zero block gets absmax 0
    and codes 0. Otherwise v = clamp(x * float32(1/absmax), -1, 1) and the code is
    table[trunc(((v + 1) * 0.5) * 65535 + 0.5)] (float32 steps) with the 65536-entry table
    of `_lookup_table`. This is not always the nearest code: the grid step is ~2**-15, far
    coarser than the dynamic map near 0 (0.0 gets code 131 = 2.1e-5, not the exact 0).
    NaN values get code 0, as bitsandbytes' AVX2 and scalar paths give.
    """
    values = np.asarray(values, np.float32).reshape(-1)
    n = values.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, np.float32)
    padded[:n] = values
    blocks = padded.reshape(nblocks, blocksize)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mag = np.abs(blocks)
        absmax = np.where(np.isnan(mag), np.float32(0), mag).max(axis=1).astype(np.float32)
        inv = np.float32(1.0) / absmax
        v = blocks * inv[:, None]
        np.clip(v, np.float32(-1.0), np.float32(1.0), out=v)
        t = (v + np.float32(1.0)) * np.float32(0.5)
        t *= np.float32(_LUT_SIZE - 1)
        t += np.float32(0.5)
        t[np.isnan(t)] = 0
        codes = _lookup_table(code)[t.astype(np.int32)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def _dequantize_8bit(codes, absmax, code, blocksize: int = NESTED_BLOCKSIZE) -> np.ndarray:
    codes = np.asarray(codes).reshape(-1)
    block_scale = np.repeat(np.asarray(absmax, np.float32), blocksize)[: codes.size]
    return np.asarray(code, np.float32)[codes] * block_scale


def _check_state(state: QuantState4bit) -> None:
    _check_options(state.quant_type, state.blocksize)
    if state.dtype not in INPUT_DTYPES:
        raise ValueError(f"state.dtype must be one of {INPUT_DTYPES}, got {state.dtype!r}")
    nblocks = state.num_blocks
    if np.asarray(state.absmax).size != nblocks:
        raise ValueError(
            f"state.absmax has {np.asarray(state.absmax).size} entries, expected {nblocks} for shape "
            f"{state.shape} and blocksize {state.blocksize}"
        )
    if state.double_quant:
        expected = -(-nblocks // state.nested_blocksize)
        if np.asarray(state.nested_absmax).size != expected:
            raise ValueError(f"state.nested_absmax has {np.asarray(state.nested_absmax).size} entries, expected {expected}")
        if state.offset is None or state.nested_code is None or np.asarray(state.nested_code).size != 256:
            raise ValueError("state.offset and a 256-entry state.nested_code are required with state.nested_absmax")


def dequantize_4bit(packed, state: QuantState4bit) -> np.ndarray:
    """Codes times block absmax in float32, rounded once to `state.dtype`, in `state.shape`."""
    _check_state(state)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    n = state.numel
    if packed.size != (n + 1) // 2:
        raise ValueError(f"packed has {packed.size} bytes, expected {(n + 1) // 2} for shape {state.shape}")
    flat = packed.reshape(-1)
    codes = np.empty(flat.size * 2, np.uint8)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0x0F
    values = DEQUANT_VALUES[state.quant_type][codes[:n]]
    scale = np.repeat(state.block_absmax().astype(np.float32), state.blocksize)[:n]
    return (values * scale).astype(dtype_of(state.dtype)).reshape(state.shape)
