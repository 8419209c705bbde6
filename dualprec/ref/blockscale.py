"""Block-scaled and row-wise low precision: the reference numerics (NumPy + ml_dtypes).

Three recipes (docs/block-scaling.md):

* **rowwise** (torchao's ``rowwise`` / ``rowwise_with_gw_hp``): one float32 scale per slice of
  a GEMM operand along an axis, ``fp8_max / max(amax, 1e-12)`` divided in float64 and rounded
  once to float32, then rounded down to a power of two; codes ``sat_cast(float32(x) * s)``.
* **mxfp8**: one E8M0 scale per block of 32 consecutive elements along the last axis; the
  four scale-rounding modes of torchao's ``ScaleCalculationMode``.
* **nvfp4**: E2M1 codes, one E4M3 scale per block of 16 along the last axis, optionally
  times one float32 tensor scale (``amax / (448 * 6)``); 16x16 weight tiles; stochastic
  rounding from a counter-based hash of (seed, element index); a 16-point random Hadamard
  transform computed with fixed-order butterflies.

Everything here is elementwise or a max (order-independent), or a fixed sequence of float32
operations, so a backend that performs the same operations gets the same bits on any device.

Where torchao's CPU code computes a power of two through float32 ``log2`` (``rceil`` MX
scales, row-wise power-of-two scales), the reference takes the exact value from the float's
bits instead.  The two differ only when the argument lies within a few float32 ulps of a power
of two, where float32 ``log2`` rounds to the integer (tests check that this is the only
difference).

Shapes that are not a multiple of the block are treated as zero-padded to the next multiple
(zeros never change a block's amax); scale arrays have ``ceil(n / block)`` entries per row.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .casts import FP8_MAX, cast

__all__ = [
    "E8M0", "E4M3", "E2M1", "MX_BLOCK", "NVFP4_BLOCK", "F4_MAX", "TENSOR_SCALE_DIVISOR",
    "amax_to_scale", "rowwise_scale", "quantize_scaled", "dequantize_scaled", "floor_pow2",
    "mx_scale_exponent", "mx_quantize", "mx_dequantize",
    "nvfp4_tensor_scale", "nvfp4_quantize", "nvfp4_dequantize", "nvfp4_quantize_2d",
    "e2m1_codes", "pack_fp4", "unpack_fp4", "sr_uniform24", "hadamard16", "rht_signs",
    "rowwise_linear", "mx_linear", "nvfp4_linear",
]

E8M0 = ml_dtypes.float8_e8m0fnu
E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
MX_BLOCK, NVFP4_BLOCK = 32, 16
F4_MAX = 6.0
E4M3_TINY = 2.0**-6  # smallest normal E4M3: torchao's lower clamp of an NVFP4 block scale
TENSOR_SCALE_DIVISOR = np.float32(448.0 * 6.0)
_ROWWISE_EPS = 1e-12
#: log2 of the largest power of two of each element format (torchao's *_MAX_POW2)
_MAX_POW2 = {"float8_e4m3fn": 8, "float8_e5m2": 15, "float4_e2m1fn": 2}
_MBITS = {"float8_e4m3fn": 3, "float8_e5m2": 2, "float4_e2m1fn": 1}
_ELEM_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "float4_e2m1fn": 6.0}
_DT = {"float8_e4m3fn": E4M3, "float8_e5m2": ml_dtypes.float8_e5m2, "float4_e2m1fn": E2M1}


def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def _bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x).view(np.int32).reshape(x.shape)


def floor_pow2(s) -> np.ndarray:
    """The largest power of two <= ``s`` (float32, exact, from the bits); 0 -> 0, inf -> inf,
    NaN -> NaN.  Subnormals keep their leading bit."""
    s = _f32(s)
    b = _bits(s).astype(np.int64) & 0x7FFFFFFF
    exp = b >> 23
    normal = (b & ~np.int64(0x7FFFFF)).astype(np.int32).view(np.float32)
    # subnormal: keep only the highest set mantissa bit
    mant = (b & 0x7FFFFF)
    top = np.where(mant > 0, np.int64(1) << np.floor(np.log2(np.maximum(mant, 1))).astype(np.int64), 0)
    sub = top.astype(np.int32).view(np.float32)
    out = np.where(exp == 0, sub, normal)
    out = np.where(np.isnan(s), np.float32(np.nan), out)
    out = np.where(np.isinf(s), np.float32(np.inf), out)
    return np.copysign(out, s).astype(np.float32)


# ----------------------------------------------------------------------------- row-wise
def amax_to_scale(amax, fmt: str = "float8_e4m3fn", *, pow2: bool = True) -> np.ndarray:
    """torchao's ``amax_to_scale``: ``fp8_max / max(amax, 1e-12)`` in float64, rounded to
    float32, then (``pow2``) rounded down to a power of two.  A NaN amax gives NaN, an
    infinite amax 0."""
    a = np.asarray(amax).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (np.float64(FP8_MAX[fmt]) / np.where(np.isnan(a), a, np.maximum(a, _ROWWISE_EPS))).astype(np.float32)
    return floor_pow2(s) if pow2 else s


def rowwise_scale(x, axis: int | None, fmt: str = "float8_e4m3fn", *, pow2: bool = True) -> np.ndarray:
    """float32 scales of ``x``: one per slice along ``axis`` (keepdims), or one for the tensor
    (``axis=None``)."""
    a = np.max(np.abs(_f32(x)), axis=axis, keepdims=axis is not None) if np.size(x) else np.float32(0)
    return amax_to_scale(a, fmt, pow2=pow2)


def quantize_scaled(x, scale, fmt: str = "float8_e4m3fn") -> np.ndarray:
    """``sat_cast(float32(x) * scale)`` (scale broadcast)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return cast(_f32(x) * _f32(scale), fmt)


def dequantize_scaled(q, scale) -> np.ndarray:
    """float32(q) / scale, the value the GEMM's rescale stands for (float32)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return (_f32(q) / _f32(scale)).astype(np.float32)


def _qdq_rowwise(x, axis, fmt="float8_e4m3fn"):
    s = rowwise_scale(x, axis, fmt)
    return quantize_scaled(x, s, fmt), s


def rowwise_linear(x, w, g=None, *, with_gw_hp: bool = False):
    """torchao's row-wise FP8 linear ``y = x @ w.T`` (x: (M, K), w: (N, K), g: dL/dy (M, N)).

    Returns a dict of the quantized operands of each GEMM (codes and float32 scales) and the
    float32 GEMM results computed from the dequantized operands in float64 (exact for these
    sizes only up to the final float32 rounding; the backends' products are compared with a
    bound).  Forward: x per row over K, w per output channel over K.  grad_input: g per row
    over N, w per input channel over N (``with_gw_hp``: w with one power-of-two tensor scale).
    grad_weight: g and x per column over M (``with_gw_hp``: high precision, g and x as given).
    """
    x, w = _f32(x), _f32(w)
    out = {}
    out["x_q"], out["x_s"] = _qdq_rowwise(x, -1)
    out["w_q"], out["w_s"] = _qdq_rowwise(w, -1)        # w (N, K): per row = per output channel
    out["y"] = _mm(dequantize_scaled(out["x_q"], out["x_s"]), dequantize_scaled(out["w_q"], out["w_s"]).T)
    if g is None:
        return out
    g = _f32(g)
    out["g_q"], out["g_s"] = _qdq_rowwise(g, -1)
    if with_gw_hp:
        out["w_gi_q"], out["w_gi_s"] = _qdq_rowwise(w, None)
    else:
        out["w_gi_q"], out["w_gi_s"] = _qdq_rowwise(w, 0)   # per input channel, over N
    out["dx"] = _mm(dequantize_scaled(out["g_q"], out["g_s"]), dequantize_scaled(out["w_gi_q"], out["w_gi_s"]))
    if with_gw_hp:
        out["dw"] = _mm(g.T, x)
    else:
        out["g_gw_q"], out["g_gw_s"] = _qdq_rowwise(g, 0)   # per column, over M
        out["x_gw_q"], out["x_gw_s"] = _qdq_rowwise(x, 0)
        out["dw"] = _mm(dequantize_scaled(out["g_gw_q"], out["g_gw_s"]).T,
                        dequantize_scaled(out["x_gw_q"], out["x_gw_s"]))
    return out


def _mm(a, b):
    with np.errstate(invalid="ignore", over="ignore"):
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- blocks
def _blocks(x, block: int) -> tuple[np.ndarray, int]:
    """(..., n) -> (..., ceil(n/block), block), zero-padded; and n."""
    x = _f32(x)
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], axis=-1)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // block, block)), n


def _unblock(xb: np.ndarray, n: int) -> np.ndarray:
    return xb.reshape(xb.shape[:-2] + (-1,))[..., :n]


def mx_scale_exponent(amax, rounding: str = "rceil", fmt: str = "float8_e4m3fn") -> np.ndarray:
    """Biased E8M0 exponent (uint8) of each block for block amaxes ``amax`` (float32).

    floor: ``floor(log2 amax) - emax_elem``; ceil: ``ceil(log2 amax) - emax_elem``; even: the
    amax rounded to the element's mantissa width first, then floor; rceil: ``ceil(log2(amax /
    elem_max))`` with the quotient in float32.  Clamped to [-127, 127] (floor/ceil/even may
    reach 128 for an infinite amax: exponent 255); a NaN amax gives 255.
    """
    a = _f32(amax)
    nan = np.isnan(a)
    if rounding == "rceil":
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            d = a / np.float32(_ELEM_MAX[fmt])
        b = _bits(d).astype(np.int64) & 0x7FFFFFFF
        e, m = b >> 23, b & 0x7FFFFF
        # exact ceil(log2 d) for d > 0 (subnormal d: below 2**-126, clamps to -127 anyway)
        c = np.where(e == 0, -127, e - 127 + (m != 0))
        c = np.where(d == 0, -127, c)
        biased = np.clip(c, -127, 127) + 127
        biased = np.where(np.isinf(d), 254, biased)
        return np.where(nan, 255, biased).astype(np.uint8)
    b = _bits(a).astype(np.int64)
    if rounding == "even":
        mbits = _MBITS[fmt]
        b = (b + (1 << (23 - mbits - 1))) & (0x1FF << 23)
    pow2 = ((b >> 23) & 0xFF) - 127
    if rounding == "ceil":
        pow2 = pow2 + ((b & 0x7FFFFF) > 0)
    elif rounding not in ("floor", "even"):
        raise ValueError(f"rounding must be one of rceil, floor, ceil, even; got {rounding!r}")
    biased = np.clip(pow2 - _MAX_POW2[fmt], -127, 128) + 127
    return np.where(nan, 255, biased).astype(np.uint8)


def _e8m0_value(biased: np.ndarray) -> np.ndarray:
    """2**(biased - 127) as float32 (255 -> NaN); 2**-127 is a float32 subnormal."""
    with np.errstate(under="ignore"):
        out = np.ldexp(np.float32(1.0), biased.astype(np.int32) - 127).astype(np.float32)
    return np.where(biased == 255, np.float32(np.nan), out)


def mx_quantize(x, rounding: str = "rceil", fmt: str = "float8_e4m3fn", block: int = MX_BLOCK):
    """MX quantization along the last axis: (E8M0 scales as ``float8_e8m0fnu``, codes).

    Each block's elements become ``sat_cast(x / 2**e)``, computed as torchao computes them:
    rceil multiplies by the float32 reciprocal ``2**(127 - biased)`` (1.0 for biased 0,
    2**-127 for biased 254, NaN for 255); floor/ceil/even divide by ``max(2**e, 2**-126)``.
    """
    xb, n = _blocks(x, block)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(xb), axis=-1)
    biased = mx_scale_exponent(amax, rounding, fmt)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if rounding == "rceil":
            rcp = np.ldexp(np.float32(1.0), 127 - biased.astype(np.int32)).astype(np.float32)
            rcp = np.where(biased == 0, np.float32(1.0), rcp)
            rcp = np.where(biased == 254, np.float32(2.0**-127), rcp)
            rcp = np.where(biased == 255, np.float32(np.nan), rcp)
            scaled = xb * rcp[..., None]
        else:
            # the scale torchao divides by: bits (biased << 23), i.e. +inf for 255, floored at 2**-126
            s: np.ndarray = (biased.astype(np.int32) << 23).view(np.float32)
            s = np.maximum(s, np.float32(2.0**-126))
            scaled = xb / s[..., None]
    codes = cast(np.clip(scaled, -_ELEM_MAX[fmt], _ELEM_MAX[fmt]), fmt) if fmt in FP8_MAX else None
    if codes is None:
        raise ValueError(f"fmt must be float8_e4m3fn or float8_e5m2 for MXFP8, got {fmt!r}")
    return biased.view(E8M0), _unblock(codes, n)


def mx_dequantize(scales, codes, block: int = MX_BLOCK) -> np.ndarray:
    """float32(code) * 2**(scale - 127), NaN for scale 255 (torchao's ``to_dtype``)."""
    cb, n = _blocks(_f32(codes), block)
    s = _e8m0_value(np.asarray(scales).view(np.uint8))
    with np.errstate(invalid="ignore", over="ignore"):
        return _unblock(cb * s[..., None], n)


def mx_linear(x, w, g=None, *, rounding: str = "rceil", fmt_grad: str = "float8_e4m3fn"):
    """MXFP8 linear ``y = x @ w.T``: every GEMM operand quantized in blocks of 32 along that
    GEMM's reduction axis (forward: x and w along K; grad_input: g along N, w along N, i.e. w.T
    along its last axis; grad_weight: g and x along M).  Returns codes, scales and float32
    results from the dequantized operands."""
    x, w = _f32(x), _f32(w)
    e4 = "float8_e4m3fn"
    out = {}
    out["x_s"], out["x_q"] = mx_quantize(x, rounding, e4)
    out["w_s"], out["w_q"] = mx_quantize(w, rounding, e4)
    out["y"] = _mm(mx_dequantize(out["x_s"], out["x_q"]), mx_dequantize(out["w_s"], out["w_q"]).T)
    if g is None:
        return out
    g = _f32(g)
    out["g_s"], out["g_q"] = mx_quantize(g, rounding, fmt_grad)
    out["wt_s"], out["wt_q"] = mx_quantize(w.T, rounding, e4)
    out["dx"] = _mm(mx_dequantize(out["g_s"], out["g_q"]), mx_dequantize(out["wt_s"], out["wt_q"]).T)
    out["gt_s"], out["gt_q"] = mx_quantize(g.T, rounding, fmt_grad)
    out["xt_s"], out["xt_q"] = mx_quantize(x.T, rounding, e4)
    out["dw"] = _mm(mx_dequantize(out["gt_s"], out["gt_q"]), mx_dequantize(out["xt_s"], out["xt_q"]).T)
    return out


# ----------------------------------------------------------------------------- NVFP4
_E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def e2m1_codes(v, *, u24=None) -> np.ndarray:
    """4-bit E2M1 codes (uint8, sign in bit 3) of float32 values already clamped to [-6, 6].

    Round to nearest even, or (``u24``: uint32 random numbers < 2**24, one per element)
    stochastically: up with probability (|v| - lo) / (hi - lo), i.e. iff
    ``u24 < (|v| - lo) * 2**24 / (hi - lo)`` (exact in float32: the gaps are powers of two).
    NaN gets magnitude code 0b011 (1.5) with the NaN's sign bit, as torchao's cast does; its
    block scale is NaN, so it dequantizes to NaN whatever the code.
    """
    v = _f32(v)
    nan = np.isnan(v)
    mag = np.where(nan, np.float32(0), np.abs(v))
    sign = np.signbit(v)
    if u24 is None:
        mag_codes = mag.astype(E2M1).view(np.uint8) & 0x7
    else:
        idx = np.clip(np.searchsorted(_E2M1_GRID, mag, side="right") - 1, 0, 7)
        lo = _E2M1_GRID[idx]
        hi = _E2M1_GRID[np.minimum(idx + 1, 7)]
        gap = np.where(hi > lo, hi - lo, np.float32(1))
        thresh = ((mag - lo) * (np.float32(2.0**24) / gap)).astype(np.float32)
        up = (np.asarray(u24).astype(np.float32) < thresh) & (hi > lo)
        mag_codes = (idx + up).astype(np.uint8)
    mag_codes = np.where(nan, np.uint8(3), mag_codes).astype(np.uint8)
    return (mag_codes | (sign.astype(np.uint8) << 3)).astype(np.uint8)


def _e2m1_value(codes) -> np.ndarray:
    c = np.asarray(codes).astype(np.uint8)
    return np.where(c & 8, -1, 1).astype(np.float32) * _E2M1_GRID[c & 7]


def pack_fp4(codes) -> np.ndarray:
    """Two codes per byte along the last axis, the even element in the low nibble (torchao's)."""
    c = np.asarray(codes).astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_fp4(packed) -> np.ndarray:
    p = np.asarray(packed).astype(np.uint8)
    return np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[:-1] + (-1,))


def nvfp4_tensor_scale(amax) -> np.float32:
    """float32 ``amax / (448 * 6)`` (torchao's ``per_tensor_amax_to_scale``)."""
    with np.errstate(invalid="ignore"):
        return np.float32(np.float32(amax) / TENSOR_SCALE_DIVISOR)


def _nvfp4_block_scales(bamax, tensor_scale):
    """(E4M3 block scales, float32 reciprocal each element is multiplied by)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        bs = (bamax / np.float32(F4_MAX)).astype(np.float32)
        if tensor_scale is None:
            s8 = cast(np.clip(bs, np.float32(E4M3_TINY), np.float32(448.0)), "float8_e4m3fn")
            rcp = (np.float32(1.0) / s8.astype(np.float32)).astype(np.float32)
        else:
            ts = np.float32(tensor_scale)
            s8 = cast(np.clip((bs / ts).astype(np.float32), np.float32(E4M3_TINY), np.float32(448.0)),
                      "float8_e4m3fn")
            rcp = ((np.float32(1.0) / ts).astype(np.float32) / s8.astype(np.float32)).astype(np.float32)
    return s8, rcp


def nvfp4_quantize(x, tensor_scale=None, *, u24=None, block: int = NVFP4_BLOCK):
    """NVFP4 along the last axis: (E4M3 block scales, E2M1 codes as uint8).

    torchao's ``nvfp4_quantize``: block scale ``amax / 6`` (divided by the tensor scale when
    one is given), clamped to [2**-6, 448] and cast to E4M3; each element is multiplied by
    ``(1 / tensor_scale) / block_scale`` (``1 / block_scale`` without a tensor scale), clamped
    to [-6, 6] and rounded to E2M1 (``u24``: stochastically, see `e2m1_codes`).
    """
    xb, n = _blocks(x, block)
    with np.errstate(invalid="ignore"):
        bamax = np.max(np.abs(xb), axis=-1)
    s8, rcp = _nvfp4_block_scales(bamax, tensor_scale)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.clip((xb * rcp[..., None]).astype(np.float32), -F4_MAX, F4_MAX)
    u = None if u24 is None else _blocks(np.asarray(u24).astype(np.float32), block)[0]
    return s8, _unblock(e2m1_codes(v, u24=u), n)


def nvfp4_dequantize(scales, codes, tensor_scale=None, block: int = NVFP4_BLOCK) -> np.ndarray:
    """E2M1 value * float32(block scale) (* tensor scale first, torchao's ``get_hp_scales``)."""
    cb, n = _blocks(_e2m1_value(codes), block)
    s = np.asarray(scales).astype(np.float32)
    if tensor_scale is not None:
        s = (np.float32(tensor_scale) * s).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return _unblock((cb * s[..., None]).astype(np.float32), n)


def nvfp4_quantize_2d(w, tensor_scale, tile: int = NVFP4_BLOCK):
    """16x16 tiles of a 2-D ``w``: one E4M3 scale per tile (shape (ceil(R/16), ceil(C/16))),
    applied as in `nvfp4_quantize`; the codes of ``w.T`` are the transpose of ``w``'s."""
    w = _f32(w)
    r, c = w.shape
    pr, pc = (-r) % tile, (-c) % tile
    wp = np.pad(w, ((0, pr), (0, pc)))
    t = wp.reshape(wp.shape[0] // tile, tile, wp.shape[1] // tile, tile)
    with np.errstate(invalid="ignore"):
        tamax = np.max(np.abs(t), axis=(1, 3))
    s8, rcp = _nvfp4_block_scales(tamax, tensor_scale)
    full = np.repeat(np.repeat(rcp, tile, 0), tile, 1)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.clip((wp * full).astype(np.float32), -F4_MAX, F4_MAX)
    return s8, e2m1_codes(v)[:r, :c]


def nvfp4_dequantize_2d(scales, codes, tensor_scale, tile: int = NVFP4_BLOCK) -> np.ndarray:
    r, c = np.shape(codes)
    s = (np.float32(tensor_scale) * np.asarray(scales).astype(np.float32)).astype(np.float32)
    full = np.repeat(np.repeat(s, tile, 0), tile, 1)[:r, :c]
    with np.errstate(invalid="ignore", over="ignore"):
        return (_e2m1_value(codes) * full).astype(np.float32)


# ----- stochastic rounding bits and the Hadamard transform -------------------------------------
_M32 = 0xFFFFFFFF


def sr_uniform24(seed: int, stream: int, shape) -> np.ndarray:
    """uint32 numbers < 2**24, one per element of ``shape`` (row-major index i): a
    counter-based hash of (seed, stream, i) in 32-bit integer arithmetic, which the torch and
    JAX backends compute identically.  ``stream`` separates the tensors of one step."""
    n = int(np.prod(shape, dtype=np.int64))
    i = np.arange(n, dtype=np.uint64)
    key = np.uint64((int(seed) * 0x9E3779B1 + int(stream) * 0x85EBCA77) & _M32)
    h = (i * np.uint64(0x27D4EB2F) + key) & np.uint64(_M32)
    for mul in (0x7FEB352D, 0x846CA68B):
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(mul)) & np.uint64(_M32)
    h ^= h >> np.uint64(16)
    return (h >> np.uint64(8)).astype(np.uint32).reshape(shape)


def rht_signs(seed: int) -> np.ndarray:
    """The 16 signs (+1/-1, float32) of the random Hadamard transform for ``seed``."""
    u = sr_uniform24(seed, 0x5167, (16,))
    return np.where(u & 1, np.float32(-1.0), np.float32(1.0)).astype(np.float32)


def hadamard16(x, signs) -> np.ndarray:
    """(H16 / 4) @ diag(signs) applied along axis 0 in groups of 16 rows (rows zero-padded to a
    multiple of 16, result keeps the padding): Sylvester Hadamard by four butterfly stages
    (a + b, a - b in float32, a fixed order), then times 0.25 (exact)."""
    x = _f32(x)
    pad = (-x.shape[0]) % 16
    if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)], axis=0)
    g = x.reshape((x.shape[0] // 16, 16) + x.shape[1:]) * _f32(signs).reshape((1, 16) + (1,) * (x.ndim - 1))
    h = 1
    while h < 16:
        g = g.reshape((g.shape[0], 16 // (2 * h), 2, h) + x.shape[1:])
        a, b = g[:, :, 0], g[:, :, 1]
        with np.errstate(invalid="ignore", over="ignore"):
            g = np.stack([(a + b).astype(np.float32), (a - b).astype(np.float32)], axis=2)
        h *= 2
    return (g.reshape(x.shape) * np.float32(0.25)).astype(np.float32)


def _training_tensor_scale(t) -> np.float32:
    """The tensor scale a training GEMM uses: torchao's, except 1.0 for an all-zero tensor
    (torchao's 0 would make every block scale 0/0 = NaN)."""
    a = np.float32(np.max(np.abs(t))) if np.size(t) else np.float32(0)
    return np.float32(1.0) if a == 0 else nvfp4_tensor_scale(a)


def nvfp4_linear(x, w, g=None, *, sr: bool = True, rht: bool = True, weight_blocks: str = "16x16",
                 seed: int = 0, step: int = 0):
    """NVFP4 linear ``y = x @ w.T`` with two-level scales on every GEMM operand.

    Each operand gets its own tensor scale (``amax / 2688`` of what is quantized) and 1x16
    blocks along the GEMM's reduction axis; the weight with ``weight_blocks=16x16`` is
    quantized once in 16x16 tiles and its transpose reused for grad_input.  ``sr``: the two
    gradient operands (g for grad_input, g.T for grad_weight) round stochastically with bits
    ``sr_uniform24(seed, 2*step + k)``; ``rht``: g and x pass through `hadamard16` (signs
    ``rht_signs(seed)``) along M before the grad_weight GEMM.
    """
    x, w = _f32(x), _f32(w)
    out = {}

    def q(t, name, u24=None):
        ts = _training_tensor_scale(t)
        s, c = nvfp4_quantize(t, ts, u24=u24)
        out[f"{name}_ts"], out[f"{name}_s"], out[f"{name}_q"] = ts, s, c
        return nvfp4_dequantize(s, c, ts)

    xd = q(x, "x")
    if weight_blocks == "16x16":
        ts = _training_tensor_scale(w)
        s, c = nvfp4_quantize_2d(w, ts)
        out["w_ts"], out["w_s"], out["w_q"] = ts, s, c
        wd = nvfp4_dequantize_2d(s, c, ts)
        wtd = wd.T
    else:
        wd = q(w, "w")
        wtd = None
    out["y"] = _mm(xd, wd.T)
    if g is None:
        return out
    g = _f32(g)
    gd = q(g, "g", sr_uniform24(seed, 2 * step, g.shape) if sr else None)
    if wtd is None:
        wtd = q(np.ascontiguousarray(w.T), "wt")
    out["dx"] = _mm(gd, wtd.T)
    gt, xt = g, x
    if rht:
        signs = rht_signs(seed)
        gt, xt = hadamard16(g, signs), hadamard16(x, signs)
    gtt = np.ascontiguousarray(gt.T)
    gtd = q(gtt, "gt", sr_uniform24(seed, 2 * step + 1, gtt.shape) if sr else None)
    xtd = q(np.ascontiguousarray(xt.T), "xt")
    out["dw"] = _mm(gtd, xtd.T)
    return out


