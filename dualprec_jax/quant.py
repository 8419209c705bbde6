"""bitsandbytes' weight quantization in JAX: NF4/FP4 (optionally double-quantized) and
LLM.int8, with the same bits as `dualprec.ref` (and so as bitsandbytes on CPU), Flax linen
and nnx layers that dequantize to the compute dtype and multiply, a low-rank adapter on top
(QLoRA), and import/export in bitsandbytes' own state-dict layout.

A quantized linear layer keeps, under ``params[...]["qweight"]`` (linen) or as `QuantWeight`
variables (nnx), exactly the arrays a torch `bnb.nn.Linear4bit` / `Linear8bitLt` keeps:

    4-bit: weight  uint8 (ceil(out*in/2), 1)  codes of W[out, in] flattened row-major, two
                                              per byte, the even element in the high nibble
           absmax  float32 (blocks,)          or, double-quantized, uint8 codes of
                                              (absmax - offset) under the signed dynamic map
           nested_absmax float32 (ceil(blocks/256),), offset float32 ()   (double quant only)
    int8:  weight  int8 (out, in), SCB float32 (out,)   per-row absmax of the float16 weight

Everything static (mode, block size, dtypes) comes from the Policy, so the trees hold only
arrays.  The torch layout (W is [out, in]) is kept so checkpoints cross unchanged; linen's
kernel is [in, out], so `quantize_params` quantizes ``kernel.T``.

    prec = Precision("bf16-mixed,quant=nf4-dq(skip=head)")
    variables = prec.init(model, rng, x)          # Dense layers quantized by the policy
    y = prec.apply(model, variables, x)           # dequantize to bf16, fp32 accumulation

    params = quantize_params(params, policy, lora_rank=8, rng=key)    # QLoRA
    trainable, frozen = split_params(params)      # differentiate `trainable` only
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from dualprec import Policy
from dualprec.errors import QuantizationError
from dualprec.policy import FOUR_BIT_MODES
from dualprec.ref import fourbit as _ref4

from .casts import accumulation_dtype, jax_dtype
from .ops import accumulating_dot_general, true_divide

__all__ = [
    "QuantizationError", "QuantSpec", "quantize_4bit", "dequantize_4bit", "quantize_int8", "dequantize_int8", "int8_matmul",
    "quantized_linear", "QuantDense", "quantize_params", "split_params", "merge_params", "autocast",
    "QuantWeight", "QuantLinear", "quantize_module",
    "to_bnb_state_dict", "from_bnb_state_dict", "state_tensors", "load_state_tensors",
    "save_bnb", "load_bnb",
]

QWEIGHT = "qweight"  # the params key of a quantized layer's frozen arrays
_TINY = _ref4._TINY
_NESTED = _ref4.NESTED_BLOCKSIZE


# ----- static configuration -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What one layer's quantization needs besides arrays (hashable: a jit static argument).

    ``param_dtype`` is the dtype the weight had when it was quantized (bitsandbytes'
    ``quant_state.dtype``): dequantized values are rounded to it before the compute dtype,
    as bitsandbytes does.
    """

    mode: str
    blocksize: int = 64
    threshold: float = 6.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    @classmethod
    def of(cls, policy: Policy, path: str) -> QuantSpec | None:
        """The spec of the module at ``path`` under ``policy`` (None: not quantized)."""
        if not policy.quantizes(path):
            return None
        p = policy.for_module(path)
        q = p.quantization
        return cls(q.mode, q.blocksize, q.threshold, p.param_dtype, p.compute_dtype)

    @property
    def is_4bit(self) -> bool:
        return self.mode in FOUR_BIT_MODES

    @property
    def quant_type(self) -> str:
        return self.mode.split("-")[0]

    @property
    def double_quant(self) -> bool:
        return self.mode.endswith("-dq")

    @property
    def frozen(self) -> bool:
        """int8-training keeps a trainable float weight and quantizes it in every forward."""
        return self.mode != "int8-training"


def _check_blocksize(blocksize) -> None:
    if isinstance(blocksize, bool) or blocksize not in _ref4.BLOCKSIZES:
        raise QuantizationError(f"blocksize {blocksize!r} is not supported by bitsandbytes' 4-bit formats; "
                                f"use one of {', '.join(map(str, _ref4.BLOCKSIZES))} (quant=nf4(blocksize=64))")


def _check_quant_type(quant_type) -> None:
    if quant_type not in _ref4.QUANT_TYPES:
        raise QuantizationError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


# ----- 4-bit codec ----------------------------------------------------------------------
def _sorted_index(scaled, quant_type: str):
    """Index into the ascending codebook: the number of midpoints strictly below the value
    (an exact tie goes lower); NaN gets the top index, as NumPy's searchsorted and
    bitsandbytes give."""
    mids = jnp.asarray(_ref4._MIDPOINTS[quant_type])
    idx = jnp.searchsorted(mids, scaled, side="left").astype(jnp.uint8)
    return jnp.where(jnp.isnan(scaled), jnp.uint8(mids.size), idx)


def _flushes() -> bool:
    with np.errstate(all="ignore"):
        return bool(np.float32(1e-38) * np.float32(1.0) == 0)


def _capture_fp_env():
    """The C floating-point environment of the importing thread (subnormals kept), to run
    host callbacks in: XLA's CPU threads set flush-to-zero and denormals-are-zero, and a
    callback's NumPy code runs on them.  None where the C library does not offer it."""
    import ctypes
    import ctypes.util

    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or ctypes.util.find_library("c"))
        env = ctypes.create_string_buffer(1024)  # larger than any platform's fenv_t
        if _flushes() or libm.fegetenv(env) != 0:
            return None
        return libm, env
    except (OSError, AttributeError, TypeError):
        return None


_FP_ENV = _capture_fp_env()


@contextlib.contextmanager
def _keeping_subnormals():
    """Run NumPy on an XLA thread with the importing thread's floating-point environment."""
    if _FP_ENV is None or not _flushes():
        yield
        return
    import ctypes

    libm, env = _FP_ENV
    saved = ctypes.create_string_buffer(1024)
    libm.fegetenv(saved)
    libm.fesetenv(env)
    try:
        yield
    finally:
        libm.fesetenv(saved)


def _check_no_flush(values, what: str) -> None:
    """Refuse, rather than return other bits, where subnormals matter and still flush."""
    if not _flushes():
        return
    mag = np.ascontiguousarray(values, np.float32).view(np.int32) & 0x7FFFFFFF
    if (((mag > 0) & (mag < _SMALL_BITS)) | ((mag >= _HUGE_BITS) & (mag < 0x7F800000))).any():
        raise QuantizationError(f"{what} holds values below 2**-100 or from 2**126 up, whose codes need "
                                "subnormal arithmetic, which this platform's floating-point environment "
                                "flushes on the host; quantize it with dualprec.ref.quantize_4bit")


def _to_host(a):
    """``a`` as integers for a host callback: XLA's CPU backend flushes subnormal floats on
    their way to and from one (a bit cast does not)."""
    return lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.int32}[a.dtype.itemsize])


def _nested_state(absmax):
    """Double quantization of the absmax vector, on the host with the reference: torch's
    float32 CPU mean (bitsandbytes' offset; its cascade summation order is what makes the
    stored offset bit-identical) and bitsandbytes' 8-bit CPU kernel on (absmax - offset).
    On the host because both involve subnormals when blocks are all zero (an all-zero
    partial block stores absmax 1e-38, so the offset of a small all-zero tensor is ~2e-39),
    and XLA's CPU backend flushes subnormal results to zero.  The vector is n/blocksize
    values, quantized once."""
    def host(bits):
        a = np.asarray(bits).view(np.float32)
        with _keeping_subnormals(), np.errstate(over="ignore", invalid="ignore"):
            _check_no_flush(a, "the absmax vector")
            offset = _ref4._mean_float32(a)
            codes, nested = _ref4._quantize_8bit(a - offset)
        return (codes.astype(np.uint8), nested.astype(np.float32).view(np.int32),
                np.asarray(offset, np.float32).view(np.int32))

    n = absmax.shape[0]
    shapes = (jax.ShapeDtypeStruct((n,), jnp.uint8), jax.ShapeDtypeStruct((-(-n // _NESTED),), jnp.int32),
              jax.ShapeDtypeStruct((), jnp.int32))
    codes, nested, offset = jax.pure_callback(host, shapes, _to_host(absmax))
    return codes, lax.bitcast_convert_type(nested, jnp.float32), lax.bitcast_convert_type(offset, jnp.float32)


# XLA's CPU backend flushes float32 subnormals to zero, in inputs and results.  The codes
# bitsandbytes gives differ from a flushed computation only in blocks whose absmax is
# huge (its reciprocal, by which whole blocks are scaled, is subnormal from 2**126 up:
# every code would become 0), tiny (subnormal values then scale to visible codes) or not
# finite; such tensors are coded on the host by the reference.  Below these bounds the only
# trace of a flush is the sign of a scaled value that underflows, which FP4 codes (0 and
# 8), and that is restored from the input's sign bit.
_HUGE_BITS = int(np.float32(2.0 ** 126).view(np.int32))
_SMALL_BITS = int(np.float32(2.0 ** -100).view(np.int32))
_TINY_BITS = int(np.float32(_TINY).view(np.int32))


def _rounded(p):
    """``p`` rounded to float32 on its own: XLA's CPU backend fuses a multiply and the add that
    follows into one FMA (one rounding instead of bitsandbytes' two), and neither an
    optimization barrier nor a bit cast stops it; a select on the value does."""
    return jnp.where(p == p, p, jnp.float32(np.nan))


def _bits(a):
    return lax.bitcast_convert_type(a, jnp.int32)


def _needs_host(am):
    """Blocks (absmax >= 0 or NaN) that a flushing backend cannot code as bitsandbytes does."""
    b = _bits(am)
    return (b >= _HUGE_BITS) | ((b > 0) & (b < _SMALL_BITS))


def _device_codes(flat, quant_type, blocksize):
    """Sorted-code indices and absmax of every block, on the device (normal blocks)."""
    n = flat.size
    full = n - n % blocksize
    parts_absmax, parts_idx, host = [], [], []
    zero_idx = int(np.searchsorted(_ref4._MIDPOINTS[quant_type], np.float32(0)))

    def index(scaled, x):
        idx = _sorted_index(scaled, quant_type)
        if quant_type == "fp4":  # a positive value that underflowed (or was flushed) is (0, step/2]: code 8
            idx = jnp.where((scaled == 0) & (_bits(x) > 0), jnp.uint8(zero_idx + 1), idx)
        return idx

    if full:
        body = flat[:full].reshape(-1, blocksize)
        am = jnp.abs(body).max(axis=1)
        am = jnp.where(jnp.isnan(body).any(axis=1), jnp.float32(np.nan), am)  # not left to max's NaN rule
        # Whole blocks multiply by the float32 reciprocal (of max(absmax, 1e-38)): bitsandbytes.
        inv = jnp.where(am == 0, jnp.float32(0), jnp.float32(1.0) / am)
        scaled = jnp.clip(body * inv[:, None], -1.0, 1.0)
        parts_absmax.append(am)
        parts_idx.append(index(scaled.reshape(-1), body.reshape(-1)))
        host.append(_needs_host(am).any())
    if full < n:
        tail = flat[full:]
        tail_am = jnp.abs(tail).max()
        tail_am = jnp.where(jnp.isnan(tail).any(), jnp.float32(np.nan), tail_am)
        host.append(_needs_host(tail_am))
        # The partial block divides, and stores its absmax clamped to 1e-38 (a subnormal,
        # kept exactly by comparing bit patterns): bitsandbytes.
        stored = jnp.where(_bits(tail_am) < _TINY_BITS, jnp.float32(_TINY), tail_am)
        parts_absmax.append(stored[None])
        scaled = jnp.where(tail_am == 0, jnp.float32(0), true_divide(tail, tail_am))
        parts_idx.append(index(jnp.clip(scaled, -1.0, 1.0), tail))
    if n % 2:
        parts_idx.append(jnp.full((1,), zero_idx, jnp.uint8))
    codes = jnp.asarray(_ref4._SORT_ORDER[quant_type])[jnp.concatenate(parts_idx)]
    return jnp.concatenate(parts_absmax), codes, jnp.stack(host).any()


def _host_codes(x, quant_type, blocksize):
    """The reference's codes of ``x`` (bitsandbytes' bits for any value), on the host."""
    n = x.size

    dtype = np.dtype(x.dtype)

    def host(bits):
        with _keeping_subnormals(), np.errstate(all="ignore"):
            flat = np.asarray(bits).view(dtype).astype(np.float32).reshape(-1)
            _check_no_flush(flat, "the weight")
            absmax, codes = _ref4._codes(flat, quant_type, blocksize)
        return absmax.astype(np.float32).view(np.int32), codes.astype(np.uint8)

    shapes = (jax.ShapeDtypeStruct((-(-n // blocksize),), jnp.int32),
              jax.ShapeDtypeStruct((n + n % 2,), jnp.uint8))
    absmax, codes = jax.pure_callback(host, shapes, _to_host(x))
    return lax.bitcast_convert_type(absmax, jnp.float32), codes


def quantize_4bit(x, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> dict:
    """Packed NF4/FP4 codes of ``x`` (any shape, flattened row-major), jit-able.

    Returns ``{"weight": uint8 (ceil(n/2), 1), "absmax": ...}`` plus ``nested_absmax`` and
    ``offset`` when ``double_quant``; the same bits as ``dualprec.ref.quantize_4bit`` (and
    bitsandbytes' CPU kernels) for every value: a NaN or inf poisons its block, whatever
    the block size (bitsandbytes' behaviour; `quantize_params` refuses them up front).
    Tensors with a block that XLA's subnormal flushing would code differently (absmax from
    2**126 up, below 2**-100 but not 0, or not finite) and the double-quantization step
    are computed on the host by the reference (`jax.pure_callback`).
    """
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise QuantizationError(f"4-bit quantization takes float32, bfloat16 or float16 weights, got {x.dtype}")
    if x.size == 0:
        raise QuantizationError("cannot quantize an empty array")
    return _quantize_4bit(x, quant_type, blocksize, bool(double_quant))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_4bit(x, quant_type, blocksize, double_quant):
    absmax, codes, host = _device_codes(x.astype(jnp.float32).reshape(-1), quant_type, blocksize)
    absmax, codes = lax.cond(host, lambda: _host_codes(x, quant_type, blocksize), lambda: (absmax, codes))
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    if not double_quant:
        return {"weight": packed, "absmax": absmax}
    nested_codes, nested_absmax, offset = _nested_state(absmax)
    return {"weight": packed, "absmax": nested_codes, "nested_absmax": nested_absmax, "offset": offset}


def _block_absmax(q: Mapping):
    absmax = q["absmax"]
    if "nested_absmax" not in q:
        return absmax.astype(jnp.float32)
    code8 = jnp.asarray(_ref4.DYNAMIC_MAP)[absmax]
    scale = jnp.repeat(q["nested_absmax"].astype(jnp.float32), _NESTED)[: absmax.shape[0]]
    # One rounding per step, like bitsandbytes (code * absmax, then + offset): no FMA.
    return _rounded(code8 * scale) + q["offset"].astype(jnp.float32)


def dequantize_4bit(q: Mapping, quant_type: str, blocksize: int, shape, dtype=jnp.float32, param_dtype=None):
    """Codes times block absmax in float32, rounded once to ``param_dtype`` (the weight's
    dtype when quantized, bitsandbytes' ``quant_state.dtype``; default ``dtype``), then to
    ``dtype``: the bits bitsandbytes' generic dequantize gives."""
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    nblocks = -(-n // blocksize)
    packed = q["weight"].reshape(-1)
    if packed.dtype != jnp.uint8 or packed.size != (n + 1) // 2 or q["absmax"].size != nblocks:
        raise QuantizationError(
            f"quantized weight of {packed.size} {packed.dtype} bytes and {q['absmax'].size} absmax values does not "
            f"hold shape {shape} at blocksize {blocksize} (needs {(n + 1) // 2} uint8 bytes, {nblocks} absmax)")
    return _dequantize_4bit(dict(q), quant_type, blocksize, shape, jnp.dtype(dtype),
                            jnp.dtype(param_dtype or dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _dequantize_4bit(q, quant_type, blocksize, shape, dtype, param_dtype):
    n = int(np.prod(shape))
    w = _dequantize_flat(q["weight"].reshape(-1), _block_absmax(q), quant_type, blocksize, n, param_dtype)
    return w.astype(dtype).reshape(shape)


def _dequantize_flat(packed, absmax, quant_type, blocksize, n, dtype):
    """The first ``n`` values of the packed codes times their float32 block absmax, rounded
    once to ``dtype``."""
    nblocks = -(-n // blocksize)
    # Two nibble lookups in the 16-entry codebook (indices are in range by construction):
    # about twice as fast on CPU as one lookup in a 256-entry table of byte pairs.
    nibbles = jnp.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1).astype(jnp.int32)
    values = jnp.asarray(_ref4.DEQUANT_VALUES[quant_type]).at[nibbles].get(mode="promise_in_bounds")
    if n % blocksize == 0:
        w = values.reshape(nblocks, blocksize) * absmax[:, None]
    else:
        w = values[:n] * jnp.repeat(absmax, blocksize)[:n]
    return w.reshape(-1).astype(dtype)


#: Bytes of dequantized weight per chunk when a product materialises the weight (see
#: `_row_chunks`): well under glibc's 32 MiB ceiling for heap (not mmap) allocations.
_CHUNK_BYTES = 4 << 20


def _row_chunks(out_features: int, in_features: int, blocksize: int, itemsize: int) -> int:
    """Rows of the weight per chunk for a product that materialises the dequantized weight
    (0: one piece).  A whole materialised weight is a fresh allocation of every call, which
    the C library maps from the OS and hands back each time: one page fault per 4 KiB
    (16384 per call for a float32 8192 x 2048 weight, half the dequantization's time on the
    shared VM, measured with getrusage); chunks of a few MiB come from the reused heap and
    stay in cache for the GEMM.  A chunk holds whole quantization blocks; rows that do not
    split so stay one piece."""
    if out_features * in_features * itemsize <= 2 * _CHUNK_BYTES:
        return 0
    target = max(1, _CHUNK_BYTES // (in_features * itemsize))
    for rows in range(min(target, out_features // 2), 0, -1):
        if out_features % rows == 0 and (rows * in_features) % (2 * blocksize) == 0:
            return rows
    return 0


# ----- int8 (LLM.int8) ------------------------------------------------------------------
def _rowwise_int8(a16):
    """int8 codes round-half-even(a * 127 / absmax_row) and float32 absmax per row."""
    a32 = a16.astype(jnp.float32)
    absmax = jnp.abs(a32).max(axis=1)
    # torch evaluates bitsandbytes' 127.0 / absmax as reciprocal(absmax) * 127: two roundings.
    factor = jnp.where(absmax == 0, jnp.float32(0), (jnp.float32(1.0) / absmax) * jnp.float32(127.0))
    return jnp.rint(a32 * factor[:, None]).astype(jnp.int8), absmax


def quantize_int8(w) -> dict:
    """``{"weight": int8 [out, in], "SCB": float32 [out]}`` from the float16 rounding of
    ``w`` [out, in], as ``dualprec.ref.int8_quantize_weight`` (and bitsandbytes) give."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise QuantizationError(f"int8 quantization takes a 2-D weight [out, in], got shape {w.shape}")
    codes, scb = _rowwise_int8(w.astype(jnp.float16))
    return {"weight": codes, "SCB": scb}


def dequantize_int8(q: Mapping, dtype=jnp.float32):
    """codes * SCB / 127 in float32, rounded once to ``dtype``."""
    return (q["weight"].astype(jnp.float32) * (q["SCB"].astype(jnp.float32)[:, None]
                                               * jnp.float32(1.0 / 127.0))).astype(dtype)


_INT8_MIN_ROWS = 16


def _int8_forward(x, codes, scb, threshold: float):
    """LLM.int8 x @ W.T in float32, as ``dualprec.ref.int8_matmul``: outlier columns of x
    (any |x| >= threshold) in float32 against the dequantized weight, the rest int8 x int8
    accumulated exactly in int32 and scaled by absmax_x * SCB / 127**2."""
    lead = x.shape[:-1]
    x16 = x.astype(jnp.float16).reshape(-1, x.shape[-1])
    if threshold > 0:
        outliers = jnp.abs(x16) >= jnp.float16(threshold)
    else:
        outliers = jnp.zeros(x16.shape, bool)
    cols = outliers.any(axis=0)
    ca, sca = _rowwise_int8(jnp.where(outliers, jnp.float16(0), x16))
    ca = jnp.where(cols[None, :], jnp.int8(0), ca)
    rows = ca.shape[0]
    if rows < _INT8_MIN_ROWS:
        # XLA's CPU int8 x int8 product of a few rows is a slow scalar loop (250 ms for one row
        # of a 2048 -> 8192 layer, 65 ms for 64 rows); zero rows added and dropped change
        # nothing in an exact int32 accumulation.
        ca = jnp.pad(ca, ((0, _INT8_MIN_ROWS - rows), (0, 0)))
    acc = lax.dot_general(ca, codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)[:rows]
    scale = sca[:, None] * scb.astype(jnp.float32)[None, :]
    out = _rounded(acc.astype(jnp.float32) * scale * jnp.float32(1.0 / (127.0 * 127.0)))

    def with_outliers(out):
        w_deq = dequantize_int8({"weight": codes, "SCB": scb})
        x_out = jnp.where(cols[None, :], x16, jnp.float16(0)).astype(jnp.float32)
        return out + lax.dot_general(x_out, w_deq, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                                     preferred_element_type=jnp.float32)

    # Most inputs have no outlier column: then the float32 product (a dequantized copy of the
    # whole weight) would add exact zeros, and is skipped.
    out = lax.cond(cols.any(), with_outliers, lambda out: out, out)
    return out.reshape(*lead, codes.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def int8_matmul(x, codes, scb, threshold: float = 6.0):
    """LLM.int8 product (float32 [..., out]); the input gradient is bitsandbytes': the
    cotangent times the dequantized weight in x's dtype."""
    return _int8_forward(x, codes, scb, threshold)


def _int8_fwd(x, codes, scb, threshold):
    return _int8_forward(x, codes, scb, threshold), (x, codes, scb)


def _int8_bwd(threshold, res, g):
    x, codes, scb = res
    w = dequantize_int8({"weight": codes, "SCB": scb}, x.dtype).astype(jnp.float32)
    dx = jnp.tensordot(g.astype(x.dtype).astype(jnp.float32), w, axes=1).astype(x.dtype)
    return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scb)


int8_matmul.defvjp(_int8_fwd, _int8_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _int8_training_matmul(x, w, threshold):
    """int8-training: the float weight is quantized in every forward; the weight gradient is
    the plain g.T @ x (straight through the quantizer), as bitsandbytes' has_fp16_weights."""
    q = quantize_int8(w)
    return _int8_forward(x, q["weight"], q["SCB"], threshold)


def _int8_training_fwd(x, w, threshold):
    return _int8_training_matmul(x, w, threshold), (x, w)


def _int8_training_bwd(threshold, res, g):
    x, w = res
    q = quantize_int8(w)
    wd = dequantize_int8(q, jnp.float32)
    g32 = g.astype(x.dtype).astype(jnp.float32)
    dx = jnp.tensordot(g32, wd, axes=1).astype(x.dtype)
    x32 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    dw = (g32.reshape(-1, g.shape[-1]).T @ x32).astype(w.dtype)
    return dx, dw


_int8_training_matmul.defvjp(_int8_training_fwd, _int8_training_bwd)


# ----- the layer math, shared by linen and nnx ------------------------------------------
def _dense(x, w_t, precision, accumulate):
    """x @ w_t over x's last axis (w_t is [in, out]), accumulated in float32.  The dequantized
    weight goes in transposed: XLA's CPU backend then materialises it for its fast GEMM,
    where a [out, in] operand fused into the dot ran up to 10x slower (measured)."""
    return accumulating_dot_general(accumulate)(x, w_t, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.lru_cache(maxsize=None)
def _native_half_dot(dtype) -> bool:
    """Whether this CPU has bfloat16 dot instructions (AVX512-BF16 or AMX, from /proc/cpuinfo;
    False where unknown).  Without them XLA's bfloat16 GEMM is the slow one."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def _chunked(q, quant_type, blocksize, out_features, in_features, dtype, cast, rows):
    """(packed codes, float32 absmax) of the weight in ``out_features // rows`` chunks of
    ``rows`` rows each, and the function that dequantizes one chunk to [rows, in]: rounded
    once to ``dtype``, then converted to ``cast`` (exact: ``cast`` is as wide or wider)."""
    chunks = out_features // rows
    packed = q["weight"].reshape(chunks, rows * in_features // 2)
    absmax = _block_absmax(q).reshape(chunks, -1)

    def dequantize(p, a):
        # The barrier keeps the chunk materialised (XLA would otherwise fuse it into the dot).
        # The conversion goes inside it: left to the dot, XLA fused it into a slow GEMV loop.
        w = _dequantize_flat(p, a, quant_type, blocksize, rows * in_features, dtype).astype(cast)
        return lax.optimization_barrier(w.reshape(rows, in_features))

    return packed, absmax, dequantize


def _nt_product(x, w, precision, accumulate):
    """x [..., in] @ w[out, in].T accumulated in ``accumulate``."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=accumulate)


def _materialised_product(x, q, cfg, cast, precision, chunk=True):
    """x @ W.T with the dequantized weight materialised, in row chunks where it is large
    (`_row_chunks`) and ``chunk``: each chunk's output columns are computed from the same
    products and the same accumulation over ``in`` as the whole weight's."""
    quant_type, blocksize, out_features, compute, accumulate = cfg
    compute, accumulate = jnp.dtype(compute), jnp.dtype(accumulate)
    in_features = x.shape[-1]
    rows = _row_chunks(out_features, in_features, blocksize, jnp.dtype(cast).itemsize) if chunk else 0
    if not rows:
        w = lax.optimization_barrier(
            _dequantize_4bit(q, quant_type, blocksize, (out_features, in_features), cast, compute))
        return _nt_product(x, w, precision, accumulate)
    packed, absmax, dequantize = _chunked(q, quant_type, blocksize, out_features, in_features, compute, cast, rows)
    x2 = x.reshape(-1, in_features)
    ys = lax.map(lambda pa: _nt_product(x2, dequantize(*pa), precision, accumulate), (packed, absmax))
    return jnp.moveaxis(ys, 0, 1).reshape(*x.shape[:-1], out_features)  # [chunks, rows_x, rows] -> [.., out]


def _matmul_4bit_impl(x, q, cfg):
    quant_type, blocksize, out_features, compute, accumulate = cfg
    compute, accumulate = jnp.dtype(compute), jnp.dtype(accumulate)
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    cpu = jax.default_backend() == "cpu"
    if compute != accumulate and cpu and rows >= 16 and _native_half_dot(compute):
        # With bfloat16 dot instructions XLA's bfloat16 GEMM (float32 accumulation) is the fast
        # one: 1.7x (64 tokens) to 2.5x (512) faster than the upcast float32 GEMM below, once the
        # dequantized weight is materialised rather than fused into the dot (measured).  In
        # one piece: row chunks made this GEMM 1.6x slower at 64 and 512 tokens (measured).
        return _materialised_product(x, q, cfg, compute, None, chunk=False)
    precision = lax.Precision.HIGHEST if compute == jnp.float32 else None
    cast = compute
    if compute != accumulate and cpu:
        # XLA's CPU half-precision GEMMs are slow (2x bitsandbytes' at 64 tokens on AVX2); products
        # of half values are exact in float32, so the float32 GEMM of the upcast operands is the
        # same product accumulated in float32.
        x, cast, precision = x.astype(accumulate), accumulate, lax.Precision.HIGHEST
    if cpu and (rows >= 16 or out_features < x.shape[-1]):
        # Many rows, or a few rows into fewer outputs than inputs (a down projection): XLA fuses
        # the dequantization into a GEMV loop that ran 5x slower than materialising the weight
        # first (2048 x 8192, one token); into more outputs the fused loop is the fast one.
        return _materialised_product(x, q, cfg, cast, precision)
    w = _dequantize_4bit(q, quant_type, blocksize, (out_features, x.shape[-1]), compute, compute)
    return _dense(x, w.astype(cast).T, precision, accumulate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_4bit(x, q, cfg):
    """x @ dequantize(q).T accumulated in float32 (the frozen 4-bit product).  The backward
    (the input gradient only: the codes are frozen) dequantizes the weight again, as
    bitsandbytes does, into materialised arrays (row chunks of a large weight, see
    `_row_chunks`): left to autodiff, XLA fused the dequantization into a column-order GEMV
    and the QLoRA step at one token ran 3x slower than bitsandbytes' (measured)."""
    return _matmul_4bit_impl(x, q, cfg)


def _matmul_4bit_fwd(x, q, cfg):
    return _matmul_4bit_impl(x, q, cfg), (q, jnp.zeros((0, x.shape[-1]), x.dtype))  # x's width and dtype


def _matmul_4bit_bwd(cfg, res, g):
    q, x_like = res
    quant_type, blocksize, out_features, compute, accumulate = cfg
    compute, accumulate = jnp.dtype(compute), jnp.dtype(accumulate)
    in_features = x_like.shape[-1]
    # The cotangent holds compute-dtype values (the layer rounds its output to the compute
    # dtype): a compute-dtype GEMM accumulated in float32, rounded once (torch autocast's rule).
    g = g.astype(compute).astype(accumulate)
    # Row chunks, and the conversion inside the barrier, on the CPU only (the page faults and the
    # slow fused conversion they avoid were measured there; other backends keep the old graph).
    cpu = jax.default_backend() == "cpu"
    rows = _row_chunks(out_features, in_features, blocksize, jnp.dtype(accumulate).itemsize) if cpu else 0

    def product(gc, w):
        return lax.dot_general(gc, w.astype(accumulate), (((gc.ndim - 1,), (0,)), ((), ())),
                               precision=lax.Precision.HIGHEST, preferred_element_type=accumulate)

    if not rows:
        dx = product(g, lax.optimization_barrier(
            _dequantize_4bit(q, quant_type, blocksize, (out_features, in_features), accumulate if cpu else compute,
                             compute)))
    else:
        # Row chunks of the weight (`_row_chunks`), their products summed in float32.
        packed, absmax, dequantize = _chunked(q, quant_type, blocksize, out_features, in_features, compute,
                                              accumulate, rows)
        g2 = g.reshape(-1, out_features)
        gs = jnp.moveaxis(g2.reshape(g2.shape[0], -1, rows), 1, 0)  # [chunks, rows_g, rows]

        def step(acc, pag):
            p, a, gc = pag
            return acc + product(gc, dequantize(p, a)), None

        dx, _ = lax.scan(step, jnp.zeros((g2.shape[0], in_features), accumulate), (packed, absmax, gs))
        dx = dx.reshape(*g.shape[:-1], in_features)
    dq = {k: (np.zeros(v.shape, jax.dtypes.float0) if jnp.issubdtype(v.dtype, jnp.integer) else jnp.zeros_like(v))
          for k, v in q.items()}
    return dx.astype(x_like.dtype), dq


_matmul_4bit.defvjp(_matmul_4bit_fwd, _matmul_4bit_bwd)


def quantized_linear(x, qweight, spec: QuantSpec, out_features: int, bias=None, lora=None,
                     lora_scale: float = 1.0, kernel=None):
    """One quantized linear layer in ``spec.compute_dtype``: the weight dequantized to the
    compute dtype (frozen: no gradient), multiplied with float32 accumulation, the bias added
    in float32, one rounding; then the adapter ``(x @ A) @ B * lora_scale`` (A [in, r],
    B [r, out], trainable), each product rounded once, as peft's LoRA on a bitsandbytes layer.
    int8 modes use the LLM.int8 product; int8-training takes the float ``kernel`` [in, out].
    Under `dualprec_jax.autocast` (``Precision.apply``) it runs as written: it is the table's
    linear already."""
    from .autocast import as_traced

    with as_traced():
        return _quantized_linear(x, qweight, spec, out_features, bias, lora, lora_scale, kernel)


def _quantized_linear(x, qweight, spec, out_features, bias, lora, lora_scale, kernel):
    compute = jax_dtype(spec.compute_dtype)
    accumulate = accumulation_dtype(spec.compute_dtype)
    precision = lax.Precision.HIGHEST if compute == jnp.float32 else None
    x = jnp.asarray(x).astype(compute)
    in_features = x.shape[-1]
    if spec.is_4bit:
        q = jax.tree.map(lax.stop_gradient, dict(qweight))
        dequantize_4bit(q, spec.quant_type, spec.blocksize, (out_features, in_features))  # checks the arrays
        y = _matmul_4bit(x, q, (spec.quant_type, spec.blocksize, out_features, jnp.dtype(compute).name,
                                jnp.dtype(accumulate).name))
    elif spec.frozen:
        y = int8_matmul(x, qweight["weight"], lax.stop_gradient(qweight["SCB"]), float(spec.threshold))
    else:
        y = _int8_training_matmul(x, kernel.T, float(spec.threshold))
    if bias is not None:
        y = y + bias.astype(compute).astype(accumulate)
    y = y.astype(compute)
    if lora is not None:
        a, b = lora
        t = _dense(x, a.astype(compute), precision, accumulate).astype(compute)
        u = _dense(t, b.astype(compute), precision, accumulate).astype(compute)
        y = y + (u * jnp.asarray(lora_scale, compute)).astype(compute)
    return y


def _lora_init(rng, in_features: int, rank: int, out_features: int, dtype):
    """peft's init: A kaiming-uniform (bound 1/sqrt(in)), B zeros, so the adapter starts at 0."""
    bound = 1.0 / np.sqrt(in_features)
    a = jax.random.uniform(rng, (in_features, rank), jnp.float32, -bound, bound).astype(dtype)
    return a, jnp.zeros((rank, out_features), dtype)


def _quantize_weight(w_out_in, spec: QuantSpec) -> dict:
    """The frozen arrays of one layer from its float weight [out, in]."""
    if spec.is_4bit:
        return quantize_4bit(w_out_in.astype(jax_dtype(spec.param_dtype)), spec.quant_type, spec.blocksize,
                             spec.double_quant)
    return quantize_int8(w_out_in)


# ----- Flax linen -----------------------------------------------------------------------
class QuantDense(nn.Module):
    """A Dense layer with bitsandbytes-quantized frozen weights and an optional trainable
    low-rank adapter.  ``mode``: nf4, nf4-dq, fp4, fp4-dq, int8 or int8-training.  ``dtype``
    is the compute dtype, ``param_dtype`` the dtype of the float weight that is quantized
    (and of bias and adapter).  Params: ``qweight`` (frozen, see the module docstring),
    ``bias``, ``lora_a`` [in, r], ``lora_b`` [r, out]; int8-training keeps a float
    ``kernel`` [in, out] instead of ``qweight``."""

    features: int
    mode: str = "nf4"
    blocksize: int = 64
    threshold: float = 6.0
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_rank: int = 0
    lora_alpha: float | None = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    def spec(self) -> QuantSpec:
        return QuantSpec(self.mode, self.blocksize, self.threshold, jnp.dtype(self.param_dtype).name,
                         jnp.dtype(self.dtype).name)

    @nn.compact
    def __call__(self, x):
        spec = self.spec()
        in_features = x.shape[-1]

        def init_kernel(rng):
            return self.kernel_init(rng, (in_features, self.features), self.param_dtype)

        kernel = qweight = None
        if spec.frozen:
            qweight = self.param(QWEIGHT, lambda rng: _quantize_weight(init_kernel(rng).T, spec))
        else:
            kernel = self.param("kernel", init_kernel)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        lora = None
        if self.lora_rank:
            a = self.param("lora_a", lambda rng: _lora_init(rng, in_features, self.lora_rank, self.features,
                                                            self.param_dtype)[0])
            b = self.param("lora_b", nn.initializers.zeros_init(), (self.lora_rank, self.features),
                           self.param_dtype)
            lora = (a, b)
        scale = (self.lora_alpha or self.lora_rank or 1) / max(self.lora_rank, 1)
        return quantized_linear(x, qweight, spec, self.features, bias, lora, scale, kernel)


def _dense_layout(module) -> bool:
    """A linen Dense, or a DenseGeneral that is one (last axis to a flat feature vector)."""
    if isinstance(module, nn.Dense):
        return True
    if isinstance(module, nn.DenseGeneral):
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        return len(features) == 1 and axis == (-1,) and not module.batch_dims
    return False


def _module_path(module) -> str:
    return ".".join(str(p) for p in module.path)


def _features(module) -> int:
    f = module.features
    return int(f[0] if isinstance(f, tuple) else f)


def _intercept(policy: Policy, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not _dense_layout(module):
        return next_fun(*args, **kwargs)
    path = _module_path(module)
    spec = QuantSpec.of(policy, path)
    has_q = module.has_variable("params", QWEIGHT)
    if has_q and spec is None:
        raise QuantizationError(f"layer {path!r} holds quantized weights, but the policy does not quantize it "
                                f"(a skip pattern or override); use the policy the params were quantized with")
    if spec is None or module.is_initializing():
        return next_fun(*args, **kwargs)
    if spec.frozen and not has_q:
        raise QuantizationError(f"layer {path!r} has float params, but the policy quantizes it ({spec.mode}); "
                                "quantize them first: params = dualprec_jax.quant.quantize_params(params, policy) "
                                "(Precision.init does it)")
    (x,) = args
    get = functools.partial(module.get_variable, "params")
    lora = (get("lora_a"), get("lora_b")) if module.has_variable("params", "lora_a") else None
    scale = 1.0
    if lora is not None:
        # an array, not float(): under Precision.apply every variable is traced
        scale = jnp.asarray(get("lora_scale"), jnp.float32) if module.has_variable("params", "lora_scale") else 1.0
    bias = get("bias") if module.use_bias else None
    qweight = get(QWEIGHT) if spec.frozen else None
    kernel = get("kernel") if not spec.frozen else None
    return quantized_linear(x, qweight, spec, _features(module), bias, lora, scale, kernel)


@contextlib.contextmanager
def autocast(policy: Policy, inner=None):
    """Context manager: linen Dense layers whose params hold ``qweight`` (or that the policy
    puts in int8-training) run quantized; ``inner`` (the op-policy interceptor) is entered too."""
    with contextlib.ExitStack() as stack:
        if inner is not None:
            stack.enter_context(inner)
        stack.enter_context(nn.intercept_methods(functools.partial(_intercept, policy)))
        yield


def _join(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _walk_dense(tree, path=()):
    """(path, dict) of every linen Dense-like params dict: a 2-D ``kernel`` or a ``qweight``."""
    if not isinstance(tree, Mapping):
        return
    kernel = tree.get("kernel")
    if QWEIGHT in tree or (kernel is not None and getattr(kernel, "ndim", 0) == 2):
        yield path, tree
        return
    for k, v in tree.items():
        yield from _walk_dense(v, path + (k,))


def _replace_at(tree, path: tuple, value):
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace_at(tree[path[0]], path[1:], value)
    return out


def _check_finite(w, path: str) -> None:
    if not bool(jnp.isfinite(w).all()):
        raise QuantizationError(f"layer {path!r}: the weight contains NaN or inf, which would poison its "
                                "quantization blocks; fix the weight before quantizing")


def quantize_params(params, policy, *, lora_rank: int = 0, lora_alpha: float | None = None, rng=None):
    """A linen params tree with every Dense layer the policy quantizes (``policy.quantizes``
    of its dotted path) replaced by its frozen ``qweight`` arrays (int8-training keeps the
    float kernel, in the param dtype, trained as usual); skipped layers stay as they were.

    ``lora_rank`` > 0 adds a trainable adapter (``lora_a``, ``lora_b``, and ``lora_scale``
    = alpha / rank) to each quantized layer; ``rng`` seeds A.  Accepts a variables dict
    ({"params": ...}) too and returns the same kind.
    """
    policy = Policy.parse(policy)
    if isinstance(params, Mapping) and "params" in params and not ({"kernel", QWEIGHT} & set(params)):
        return {**params, "params": quantize_params(params["params"], policy, lora_rank=lora_rank,
                                                    lora_alpha=lora_alpha, rng=rng)}
    if lora_rank and rng is None:
        raise QuantizationError("lora_rank > 0 needs an rng to initialise the adapter: pass rng=jax.random.key(0)")
    layers = list(_walk_dense(params))
    if not layers:
        raise QuantizationError("quantize_params found no Dense layer (a params dict with a 2-D 'kernel'); "
                                "quantization applies to linear layers only")
    out = params
    quantized = 0
    for i, (path, layer) in enumerate(layers):
        name = _join(path)
        spec = QuantSpec.of(policy, name)
        if spec is None:
            continue
        if QWEIGHT in layer or "lora_a" in layer:
            raise QuantizationError(f"layer {name!r} is quantized already; quantize the float params once "
                                    "(to change the mode, start again from the float checkpoint)")
        kernel = jnp.asarray(layer["kernel"])
        new = {k: v for k, v in layer.items() if k != "kernel"}
        if spec.frozen:
            _check_finite(kernel, name)
            new[QWEIGHT] = jax.jit(_quantize_weight, static_argnums=1)(kernel.T, spec)
        else:
            new["kernel"] = kernel
        if lora_rank:
            pdt = jax_dtype(spec.param_dtype)
            new["lora_a"], new["lora_b"] = _lora_init(jax.random.fold_in(rng, i), kernel.shape[0], lora_rank,
                                                      kernel.shape[1], pdt)
            new["lora_scale"] = jnp.asarray((lora_alpha or lora_rank) / lora_rank, jnp.float32)
        out = _replace_at(out, path, new)
        quantized += 1
    if not quantized:
        raise QuantizationError("the policy's skip patterns skip every Dense layer: nothing would be "
                                f"quantized (layers: {', '.join(_join(p) for p, _ in layers)})")
    return out


def _is_frozen(path) -> bool:
    keys = [str(getattr(k, "key", k)) for k in path]
    return QWEIGHT in keys or (keys and keys[-1] == "lora_scale")


def split_params(params):
    """``(trainable, frozen)``: the frozen trees hold the quantized weights (and adapter
    scales), None elsewhere; differentiate and optimise ``trainable`` only, then
    ``merge_params(trainable, frozen)`` for the forward.  (JAX cannot differentiate the
    integer codes, and an optimizer's weight decay must never touch absmax.)"""
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: x if _is_frozen(p) else None, params)
    trainable = jax.tree_util.tree_map_with_path(lambda p, x: None if _is_frozen(p) else x, params)
    return trainable, frozen


def merge_params(trainable, frozen):
    """The inverse of `split_params`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


# ----- Flax nnx -------------------------------------------------------------------------
class QuantWeight(nnx.Variable):
    """A frozen quantized array: not an ``nnx.Param``, so ``nnx.grad`` and optimizers
    (``wrt=nnx.Param``) leave it alone."""

class QuantLinear(nnx.Module):
    """``nnx.Linear`` with bitsandbytes-quantized frozen weights (``weight``, ``absmax``,
    ``nested_absmax``, ``offset`` / ``SCB`` as `QuantWeight`), a float ``bias`` and an
    optional trainable adapter ``lora_a`` [in, r], ``lora_b`` [r, out]."""

    def __init__(self, in_features: int, out_features: int, *, spec: QuantSpec, use_bias: bool = True,
                 lora_rank: int = 0, lora_alpha: float | None = None, kernel=None, bias=None, rngs):
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        pdt = jax_dtype(spec.param_dtype)
        if kernel is None:
            kernel = nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features), pdt)
        kernel = jnp.asarray(kernel)
        if spec.frozen:
            for k, v in _quantize_weight(kernel.T, spec).items():
                setattr(self, k, QuantWeight(v))
            self.kernel = None
        else:
            self.kernel = nnx.Param(kernel.astype(pdt))
        self.bias = nnx.Param(jnp.zeros((out_features,), pdt) if bias is None else jnp.asarray(bias)) \
            if use_bias else None
        self.lora_rank = lora_rank
        self.lora_scale = (lora_alpha or lora_rank or 1) / max(lora_rank, 1)
        if lora_rank:
            a, b = _lora_init(rngs.params(), in_features, lora_rank, out_features, pdt)
            self.lora_a, self.lora_b = nnx.Param(a), nnx.Param(b)

    @classmethod
    def from_linear(cls, linear, spec: QuantSpec, *, lora_rank: int = 0, lora_alpha=None, rngs=None):
        bias = linear.bias.get_value() if linear.bias is not None else None
        kernel = linear.kernel.get_value()
        return cls(linear.in_features, linear.out_features, spec=spec, use_bias=bias is not None,
                   lora_rank=lora_rank, lora_alpha=lora_alpha, kernel=kernel, bias=bias,
                   rngs=rngs if rngs is not None else nnx.Rngs(0))

    def qweight(self) -> dict:
        names = ("weight", "absmax", "nested_absmax", "offset") if self.spec.is_4bit else ("weight", "SCB")
        return {k: getattr(self, k).get_value() for k in names if hasattr(self, k)}

    def __call__(self, x):
        lora = (self.lora_a.get_value(), self.lora_b.get_value()) if self.lora_rank else None
        bias = self.bias.get_value() if self.bias is not None else None
        kernel = self.kernel.get_value() if self.kernel is not None else None
        qweight = self.qweight() if self.spec.frozen else None
        return quantized_linear(x, qweight, self.spec, self.out_features, bias, lora, self.lora_scale, kernel)



def quantize_module(model, policy, *, lora_rank: int = 0, lora_alpha: float | None = None, rngs=None):
    """An nnx model (in place) with every ``nnx.Linear`` the policy quantizes replaced by a
    `QuantLinear`; skipped paths stay as they were.  Mirrors ``dualprec_torch.quant``."""
    policy = Policy.parse(policy)
    found, replaced = [], []
    for keys, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            raise QuantizationError(f"layer {_join(keys)!r} is quantized already; quantize the float model once")
        if isinstance(node, nnx.Linear):
            if not keys:
                raise TypeError("quantize_module() takes a model that contains Linear layers, not a single "
                                "nnx.Linear; wrap it in an nnx.Module")
            found.append(_join(keys))
            spec = QuantSpec.of(policy, _join(keys))
            if spec is not None:
                replaced.append((keys, QuantLinear.from_linear(node, spec, lora_rank=lora_rank,
                                                               lora_alpha=lora_alpha, rngs=rngs)))
    if not found:
        raise QuantizationError("quantize_module found no nnx.Linear layer; quantization applies to linear layers only")
    if not replaced:
        raise QuantizationError(f"the policy's skip patterns skip every Linear layer ({', '.join(found)})")
    for keys, new in replaced:
        _set_child(model, keys, new)
    return model


def _set_child(model, keys, value) -> None:
    parent = model
    for k in keys[:-1]:
        parent = parent[k] if isinstance(k, int) or not hasattr(parent, str(k)) else getattr(parent, str(k))
    if isinstance(keys[-1], int) or not hasattr(parent, str(keys[-1])):
        parent[keys[-1]] = value
    else:
        setattr(parent, str(keys[-1]), value)


# ----- bitsandbytes' state-dict layout ----------------------------------------------------
def _quant_state_json(spec: QuantSpec, shape, q: Mapping) -> bytes:
    """``QuantState.as_dict(packed=True)``'s JSON: the same keys, order and number format."""
    d = {"quant_type": spec.quant_type, "blocksize": int(spec.blocksize), "dtype": spec.param_dtype,
         "shape": [int(s) for s in shape]}
    if "nested_absmax" in q:
        d.update(nested_blocksize=_NESTED, nested_dtype="float32",
                 nested_offset=float(np.asarray(q["offset"], np.float32)))
    return json.dumps(d).encode("utf-8")


def _stored_as(packed: np.ndarray, storage: str, name: str) -> np.ndarray:
    """The packed bytes viewed as bitsandbytes' ``quant_storage`` dtype (FSDP wants the
    weight in the float dtype of its neighbours); bnb's layout is (bytes / itemsize, 1)."""
    dtype = np.dtype(_ref4.dtype_of(storage)) if storage != "uint8" else np.dtype(np.uint8)
    if packed.size % dtype.itemsize:
        raise QuantizationError(f"layer {name!r}: {packed.size} packed bytes do not fill whole {storage} "
                                f"values; use quant_storage='uint8', which holds any "
                                "element count (bitsandbytes itself fails on this one)")
    return np.ascontiguousarray(packed).reshape(-1).view(dtype).reshape(-1, 1)


def _layer_to_bnb(name: str, layer: Mapping, spec: QuantSpec | None, shape=None, storage="uint8") -> dict:
    p = name + "."
    extra = set(layer) - {"kernel", "bias", QWEIGHT}
    if extra:
        raise QuantizationError(f"layer {name!r} has {sorted(extra)} (an adapter?), which bitsandbytes' Linear "
                                "layers do not hold; export the base model's params (merge or drop the adapter)")
    out = {}
    if spec is not None and spec.frozen:
        q = {k: np.asarray(v) for k, v in layer[QWEIGHT].items()}
        out[p + "weight"] = _stored_as(q["weight"], storage, name) if spec.is_4bit else q["weight"]
        if spec.is_4bit:
            shape = shape or _shape_of(name, q, spec, layer)
            out[p + "weight.absmax"] = q["absmax"]
            out[p + "weight.quant_map"] = _ref4.CODEBOOKS[spec.quant_type].copy()
            if "nested_absmax" in q:
                out[p + "weight.nested_absmax"] = q["nested_absmax"]
                out[p + "weight.nested_quant_map"] = _ref4.DYNAMIC_MAP.copy()
            blob = _quant_state_json(spec, shape, q)
            out[p + f"weight.quant_state.bitsandbytes__{spec.quant_type}"] = np.frombuffer(blob, np.uint8).copy()
        else:
            out[p + "SCB"] = q["SCB"]
            out[p + "weight_format"] = np.array(0, np.uint8)
    else:
        out[p + "weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
    if "bias" in layer:
        out[p + "bias"] = np.asarray(layer["bias"])
    return out


def _shape_of(name: str, q: Mapping, spec: QuantSpec, layer: Mapping) -> tuple:
    """(out, in) of a 4-bit layer: out from its bias, in from the packed size and block count."""
    if "bias" not in layer:
        raise QuantizationError(f"layer {name!r} has no bias, so its [out, in] shape is not in the params; "
                                f"pass shapes={{{name!r}: (out, in)}}")
    n_out = int(layer["bias"].shape[0])
    nbytes, nblocks = int(np.asarray(q["weight"]).size), int(np.asarray(q["absmax"]).size)
    for n in (2 * nbytes, 2 * nbytes - 1):
        if n % n_out == 0 and -(-n // spec.blocksize) == nblocks:
            return (n_out, n // n_out)
    raise QuantizationError(f"layer {name!r}: {nbytes} packed bytes do not hold {n_out} output rows")


def to_bnb_state_dict(params, policy, *, shapes: Mapping | None = None,
                      quant_storage: str = "uint8") -> dict[str, np.ndarray]:
    """The linen params as the state dict of the torch model with the same module paths, in
    bitsandbytes' keys: ``<path>.weight`` (packed uint8 / int8 / float [out, in]),
    ``.weight.absmax``, ``.weight.quant_map``, ``.weight.nested_absmax``,
    ``.weight.nested_quant_map``, ``.weight.quant_state.bitsandbytes__<nf4|fp4>`` (the JSON
    ``QuantState.as_dict(packed=True)`` writes), ``.SCB``, ``.weight_format``, ``.bias``.
    Only Dense layers are exported; ``shapes`` gives (out, in) of bias-less 4-bit layers;
    ``quant_storage`` (uint8, bfloat16, float16, float32) is bitsandbytes' option of that name."""
    policy = Policy.parse(policy)
    out = {}
    for path, layer in _walk_dense(params):
        name = _join(path)
        spec = QuantSpec.of(policy, name)
        if (QWEIGHT in layer) != bool(spec and spec.frozen):
            raise QuantizationError(f"layer {name!r}: the params are {'quantized' if QWEIGHT in layer else 'float'} "
                                    "but the policy says otherwise; pass the policy the params were built with")
        out.update(_layer_to_bnb(name, layer, spec, (shapes or {}).get(name), quant_storage))
    if not out:
        raise QuantizationError("no Dense layer in the params to export")
    return out


def _parse_quant_state(blob, key: str) -> dict:
    try:
        return json.loads(bytes(np.asarray(blob, np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantizationError(f"{key}: not bitsandbytes' packed quant_state JSON ({e})") from None


def _as_uint8(weight, key: str, nbytes: int):
    w = np.asarray(weight)
    raw = np.ascontiguousarray(w).view(np.uint8).reshape(-1)  # bnb may store the bytes as bf16/fp32
    if raw.size != nbytes:
        raise QuantizationError(f"{key}: {raw.size} bytes of packed codes, expected {nbytes} "
                                f"(shape {w.shape}, dtype {w.dtype})")
    return raw.reshape(-1, 1)


def _layer_from_bnb(name: str, tensors: Mapping, template: Mapping, spec: QuantSpec | None, used: set) -> dict:
    p = name + "."

    def take(key):
        if key not in tensors:
            raise QuantizationError(f"checkpoint has no {key!r}, which layer {name!r} needs "
                                    f"(keys it has under {p!r}: {sorted(k for k in tensors if k.startswith(p))})")
        used.add(key)
        return np.asarray(tensors[key])

    if QWEIGHT in template:
        raise QuantizationError(f"layer {name!r}: load into float params (or jax.eval_shape of them), "
                                "not into already-quantized ones")
    kernel = template["kernel"]
    n_in, n_out = (int(s) for s in kernel.shape)
    new = {}
    if spec is not None and spec.frozen and spec.is_4bit:
        qs_keys = [k for k in tensors if k.startswith(p + "weight.quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise QuantizationError(f"layer {name!r}: expected one {p}weight.quant_state.bitsandbytes__<nf4|fp4> "
                                    f"entry, found {qs_keys} (a float or int8 checkpoint for a {spec.mode} policy?)")
        qs = _parse_quant_state(take(qs_keys[0]), qs_keys[0])
        shape = tuple(qs.get("shape", ()))
        if shape != (n_out, n_in):
            raise QuantizationError(f"{qs_keys[0]}: the checkpoint's weight has shape {list(shape)} [out, in], "
                                    f"the JAX layer {name!r} needs [{n_out}, {n_in}] (kernel {list(kernel.shape)})")
        if (qs.get("quant_type"), qs.get("blocksize")) != (spec.quant_type, spec.blocksize):
            raise QuantizationError(f"layer {name!r}: the checkpoint is {qs.get('quant_type')} blocksize "
                                    f"{qs.get('blocksize')}, the policy {spec.quant_type} blocksize {spec.blocksize}; "
                                    "use the policy the checkpoint was quantized with")
        if qs.get("dtype") != spec.param_dtype:
            raise QuantizationError(f"layer {name!r}: the checkpoint was quantized from {qs.get('dtype')} weights, "
                                    f"the policy's params are {spec.param_dtype}; use params={qs.get('dtype')}")
        nested = "nested_offset" in qs
        if nested != spec.double_quant:
            raise QuantizationError(f"layer {name!r}: the checkpoint is {'' if nested else 'not '}double-quantized, "
                                    f"the policy says {spec.mode}")
        n = n_in * n_out
        nblocks = -(-n // spec.blocksize)
        q = {"weight": _as_uint8(take(p + "weight"), p + "weight", (n + 1) // 2)}
        if not np.array_equal(take(p + "weight.quant_map"), _ref4.CODEBOOKS[spec.quant_type]):
            raise QuantizationError(f"{p}weight.quant_map is not bitsandbytes' {spec.quant_type} codebook")
        absmax = take(p + "weight.absmax")
        if absmax.shape != (nblocks,) or absmax.dtype != (np.uint8 if nested else np.float32):
            raise QuantizationError(f"{p}weight.absmax has shape {list(absmax.shape)} {absmax.dtype}, expected "
                                    f"[{nblocks}] {'uint8' if nested else 'float32'}")
        q["absmax"] = absmax
        if nested:
            if qs.get("nested_blocksize") != _NESTED or not np.array_equal(take(p + "weight.nested_quant_map"),
                                                                           _ref4.DYNAMIC_MAP):
                raise QuantizationError(f"layer {name!r}: nested quantization other than bitsandbytes' "
                                        "256-block signed dynamic map is not supported")
            q["nested_absmax"] = take(p + "weight.nested_absmax").astype(np.float32)
            q["offset"] = np.asarray(qs["nested_offset"], np.float32)
        new[QWEIGHT] = {k: jnp.asarray(v) for k, v in q.items()}
    elif spec is not None and spec.frozen:
        w, scb = take(p + "weight"), take(p + "SCB")
        if w.shape != (n_out, n_in) or w.dtype != np.int8 or scb.shape != (n_out,):
            raise QuantizationError(f"{p}weight/SCB have shapes {list(w.shape)} {w.dtype} / {list(scb.shape)}, "
                                    f"layer {name!r} needs int8 [{n_out}, {n_in}] / [{n_out}]")
        if p + "weight_format" in tensors and int(take(p + "weight_format")) != 0:
            raise QuantizationError(f"{p}weight_format is not 0 (row-major); re-save it with bitsandbytes >= 0.45")
        new[QWEIGHT] = {"weight": jnp.asarray(w), "SCB": jnp.asarray(scb.astype(np.float32))}
    else:
        w = take(p + "weight")
        if w.shape != (n_out, n_in):
            raise QuantizationError(f"{p}weight has shape {list(w.shape)}, layer {name!r} needs [{n_out}, {n_in}]")
        new["kernel"] = jnp.asarray(w.T, dtype=kernel.dtype)
    if "bias" in template:
        b = take(p + "bias")
        if b.shape != tuple(template["bias"].shape):
            raise QuantizationError(f"{p}bias has shape {list(b.shape)}, layer {name!r} needs {list(template['bias'].shape)}")
        new["bias"] = jnp.asarray(b, template["bias"].dtype)
    return new


def from_bnb_state_dict(tensors: Mapping, params, policy, *, strict: bool = True):
    """Params for the linen model whose float ``params`` (or their `jax.eval_shape`) are
    given, from a bitsandbytes state dict (``to_bnb_state_dict``'s layout, or a torch
    ``Linear4bit`` / ``Linear8bitLt`` model's).  Shapes, quant type, block size and dtype
    are checked against the params and the policy; ``strict`` refuses keys left over."""
    policy = Policy.parse(policy)
    used: set = set()
    out = params
    layers = list(_walk_dense(params))
    if not layers:
        raise QuantizationError("the params have no Dense layer to load into")
    for path, layer in layers:
        name = _join(path)
        out = _replace_at(out, path, _layer_from_bnb(name, tensors, layer, QuantSpec.of(policy, name), used))
    left = sorted(set(tensors) - used)
    if strict and left:
        raise QuantizationError(f"checkpoint keys with no Dense layer in the params: {left}; "
                                "pass strict=False to ignore them")
    return out


def state_tensors(params, policy) -> dict[str, np.ndarray]:
    """The quantized layers' tensors under bitsandbytes' key names (for dualprec checkpoints)."""
    policy = Policy.parse(policy)
    full = to_bnb_state_dict(params, policy)
    names = [_join(p) + "." for p, layer in _walk_dense(params) if QWEIGHT in layer]
    return {k: v for k, v in full.items() if any(k.startswith(n) for n in names) and not k.endswith(".bias")}


def load_state_tensors(params, policy, tensors: Mapping):
    """``params`` with the quantized layers named in ``tensors`` replaced by them."""
    policy = Policy.parse(policy)
    out = params
    used: set = set()
    for path, layer in _walk_dense(params):
        name = _join(path)
        spec = QuantSpec.of(policy, name)
        if spec is None or not spec.frozen or not any(k.startswith(name + ".") for k in tensors):
            continue
        template = {"kernel": _kernel_struct(layer, spec)}
        new = _layer_from_bnb(name, tensors, template, spec, used)
        out = _replace_at(out, path, {**{k: v for k, v in layer.items() if k not in ("kernel", QWEIGHT)}, **new})
    left = sorted(set(tensors) - used)
    if left:
        raise QuantizationError(f"quantized-weight tensors with no quantized layer in the params: {left}")
    return out


def _kernel_struct(layer, spec):
    if "kernel" in layer:
        return layer["kernel"]
    q = layer[QWEIGHT]
    if spec.is_4bit:
        n_out_in = _shape_of("layer", q, spec, layer)
    else:
        n_out_in = tuple(q["weight"].shape)
    return jax.ShapeDtypeStruct((n_out_in[1], n_out_in[0]), jnp.float32)


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("saving and loading bitsandbytes checkpoints needs safetensors: "
                          "pip install safetensors (or pip install 'dualprec[jax]')") from None
    return safetensors.numpy


def save_bnb(path, params, policy, *, quant_storage: str = "uint8") -> None:
    """`to_bnb_state_dict` written with safetensors (a torch bitsandbytes model loads it),
    atomically and with dualprec's checksum over the whole file (`dualprec.checkpoint.write_checked`)."""
    _safetensors()
    from dualprec.checkpoint import write_checked

    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes weight_format 1-d)
    tensors = to_bnb_state_dict(params, policy, quant_storage=quant_storage)
    write_checked(path, {k: np.require(v, requirements="C") for k, v in tensors.items()})


def load_bnb(path, params, policy, *, strict: bool = True):
    """`from_bnb_state_dict` of a safetensors file (no pickle).  A file dualprec wrote is
    checked against its checksum; CheckpointError when it is damaged or not safetensors."""
    _safetensors()
    from dualprec.checkpoint import read_checked

    _, tensors, _ = read_checked(path, require=False)
    return from_bnb_state_dict(tensors, params, policy, strict=strict)
