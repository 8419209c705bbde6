"""Block-scaled and row-wise low-precision dots for JAX, emulated exactly.

The recipes of `dualprec.ref.blockscale` (docs/block-scaling.md), with the torch backend's
function names (`dualprec_torch.blockscale`).  Scales and codes are computed with the
reference's operations (bit manipulation with ``lax.bitcast_convert_type``, elementwise float32
arithmetic, maxima), so they equal the reference's and torch's bit for bit; the GEMMs are
``dot_general`` on the dequantized float32 operands (``preferred_element_type=float32``).

``block_linear(x, w, recipe, seed, step)`` is differentiable (custom VJP: the three GEMMs of
the recipe); ``seed`` and ``step`` are the precision state (stochastic rounding draws
``sr_uniform24(seed, 2*step + k)``, the Hadamard signs ``rht_signs(seed)``): the caller
advances ``step`` once per gradient evaluation, as the torch layer does in its backward.

XLA:CPU flushes float32 subnormals to zero, so inputs or scales below 2**-126 (subnormal
blocks, the 2**-127 reciprocal of an infinite RCEIL block) can differ from the reference on CPU.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dualprec.policy import FP8Recipe

from .ops import as_written, true_divide

__all__ = ["floor_pow2", "rowwise_scale", "quantize_scaled", "dequantize_scaled", "mx_quantize",
           "mx_dequantize", "e2m1_codes", "e2m1_value", "nvfp4_tensor_scale", "nvfp4_quantize",
           "nvfp4_dequantize", "nvfp4_quantize_2d", "nvfp4_dequantize_2d", "sr_uniform24", "rht_signs",
           "hadamard16", "block_linear_parts", "block_linear_parts_jit", "block_linear", "layer_seed"]

_F8 = {"float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}
_ELEM_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
_MAX_POW2 = {"float8_e4m3fn": 8, "float8_e5m2": 15}
_MBITS = {"float8_e4m3fn": 3, "float8_e5m2": 2}
_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _bits(x):
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _from_bits(b):
    return lax.bitcast_convert_type(b.astype(jnp.uint32), jnp.float32)


def floor_pow2(s):
    s = s.astype(jnp.float32)
    out = _from_bits(_bits(s) & jnp.uint32(0x7F800000))
    out = jnp.where(jnp.isnan(s) | jnp.isinf(s) | (s == 0), jnp.abs(s), out)
    return jnp.copysign(out, s)


def rowwise_scale(x, axis, fmt="float8_e4m3fn"):
    """torchao's power-of-two scale ``floor_pow2(float32(fp8_max / max(amax, 1e-12)))``.  torchao
    divides in float64 and rounds to float32; for float32 operands that double rounding equals
    the correctly rounded float32 quotient (53 >= 2*24 + 2), so the float32 division here gives
    the same scale without x64.  (1e-12 is not a float32: an amax below it gives 448/1e-12 in
    either form, 2**48 after the power-of-two rounding.)"""
    a = jnp.abs(x.astype(jnp.float32))
    a = jnp.max(a) if axis is None else jnp.max(a, axis=axis, keepdims=True)
    a = jnp.where(jnp.isnan(a), a, jnp.maximum(a, jnp.float32(1e-12)))
    return floor_pow2(jnp.float32(_ELEM_MAX[fmt]) / a)


def quantize_scaled(x, scale, fmt="float8_e4m3fn"):
    m = jnp.float32(_ELEM_MAX[fmt])
    return jnp.clip(x.astype(jnp.float32) * scale, -m, m).astype(_F8[fmt])


def dequantize_scaled(q, scale):
    return true_divide(q.astype(jnp.float32), scale)


def _blocks(x, block):
    x = x.astype(jnp.float32)
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(x.shape[:-1] + (x.shape[-1] // block, block)), n


def _unblock(xb, n):
    return xb.reshape(xb.shape[:-2] + (-1,))[..., :n]


def mx_scale_exponent(amax, rounding="rceil", fmt="float8_e4m3fn"):
    a = amax.astype(jnp.float32)
    nan = jnp.isnan(a)
    if rounding == "rceil":
        d = true_divide(a, jnp.float32(_ELEM_MAX[fmt]))
        b = (_bits(d) & jnp.uint32(0x7FFFFFFF)).astype(jnp.int32)
        e, m = b >> 23, b & 0x7FFFFF
        c = jnp.where(e == 0, -127, e - 127 + (m != 0).astype(jnp.int32))
        biased = jnp.clip(c, -127, 127) + 127
        biased = jnp.where(jnp.isinf(d), 254, biased)
        return jnp.where(nan, 255, biased).astype(jnp.uint8)
    b = _bits(a)
    if rounding == "even":
        b = (b + jnp.uint32(1 << (23 - _MBITS[fmt] - 1))) & jnp.uint32(0x1FF << 23)
    pow2 = ((b >> 23) & 0xFF).astype(jnp.int32) - 127
    if rounding == "ceil":
        pow2 = pow2 + ((b & 0x7FFFFF) > 0).astype(jnp.int32)
    elif rounding not in ("floor", "even"):
        raise ValueError(f"rounding must be one of rceil, floor, ceil, even; got {rounding!r}")
    biased = jnp.clip(pow2 - _MAX_POW2[fmt], -127, 128) + 127
    return jnp.where(nan, 255, biased).astype(jnp.uint8)


def _pow2_of_biased(e):
    e = e.astype(jnp.int32)
    normal = _from_bits(jnp.maximum(e, 1).astype(jnp.uint32) << 23)
    return jnp.where(e == 0, jnp.float32(2.0**-127), normal)


def mx_quantize(x, rounding="rceil", fmt="float8_e4m3fn", block=32):
    xb, n = _blocks(x, block)
    biased = mx_scale_exponent(jnp.max(jnp.abs(xb), axis=-1), rounding, fmt)
    e = biased.astype(jnp.int32)
    if rounding == "rceil":
        rcp = _pow2_of_biased(jnp.clip(254 - e, 0, 254))
        rcp = jnp.where(e == 0, jnp.float32(1.0), rcp)
        rcp = jnp.where(e == 254, jnp.float32(2.0**-64), rcp)  # 2**-127 in two steps, below
        rcp = jnp.where(e == 255, jnp.float32(jnp.nan), rcp)
        scaled = xb * rcp[..., None]
        # 2**-127 is subnormal, which XLA:CPU flushes to zero: multiply by 2**-64 then 2**-63.
        # The first product is exact wherever the result can be a non-zero code.
        scaled = jnp.where((e == 254)[..., None], scaled * jnp.float32(2.0**-63), scaled)
    else:
        s = jnp.where(e == 255, jnp.float32(jnp.inf), _from_bits(jnp.minimum(e, 254).astype(jnp.uint32) << 23))
        s = jnp.maximum(s, jnp.float32(2.0**-126))
        scaled = true_divide(xb, s[..., None])
    m = jnp.float32(_ELEM_MAX[fmt])
    return biased, _unblock(jnp.clip(scaled, -m, m).astype(_F8[fmt]), n)


def mx_dequantize(biased, codes, block=32):
    cb, n = _blocks(codes.astype(jnp.float32), block)
    e = biased.astype(jnp.int32)
    s = jnp.where(e == 255, jnp.float32(jnp.nan), _pow2_of_biased(jnp.minimum(e, 254)))
    s = jnp.where(e == 0, jnp.float32(2.0**-64), s)  # 2**-127 = 2**-64 * 2**-63 (no subnormal constant)
    out = cb * s[..., None]
    out = jnp.where((e == 0)[..., None], out * jnp.float32(2.0**-63), out)
    return _unblock(out, n)


def e2m1_codes(v, u24=None):
    nan = jnp.isnan(v)
    mag = jnp.where(nan, jnp.float32(0), jnp.abs(v))
    sign = jnp.signbit(v)
    if u24 is None:
        idx = sum(c.astype(jnp.int32) for c in (mag > 0.25, mag >= 0.75, mag > 1.25, mag >= 1.75,
                                                 mag > 2.5, mag >= 3.5, mag > 5.0))
    else:
        idx = sum((mag >= jnp.float32(g)).astype(jnp.int32) for g in _GRID[1:])
        lo, hi = _grid_value(idx), _grid_value(jnp.minimum(idx + 1, 7))
        gap = jnp.where(hi > lo, hi - lo, jnp.float32(1))
        thresh = (mag - lo) * (jnp.float32(2.0**24) / gap)
        up = (u24.astype(jnp.float32) < thresh) & (hi > lo)
        idx = idx + up.astype(jnp.int32)
    idx = jnp.where(nan, 3, idx)
    return (idx | (sign.astype(jnp.int32) << 3)).astype(jnp.uint8)


def _grid_value(i):
    """The E2M1 magnitude of index ``i`` (0..7) from literals only: an array constant here
    would be closed over by the custom VJPs that use it, which the autocast cannot re-bind."""
    out = i.astype(jnp.float32) * jnp.float32(0.5)  # 0, 0.5, 1, 1.5 for i < 4
    for k in (4, 5, 6, 7):
        out = jnp.where(i == k, jnp.float32(_GRID[k]), out)
    return out


def e2m1_value(codes):
    c = codes.astype(jnp.int32)
    return jnp.where((c & 8) != 0, jnp.float32(-1), jnp.float32(1)) * _grid_value(c & 7)


def nvfp4_tensor_scale(amax):
    return true_divide(amax.astype(jnp.float32), jnp.float32(2688.0))


def _training_tensor_scale(t):
    a = jnp.max(jnp.abs(t.astype(jnp.float32))) if t.size else jnp.float32(0)
    return jnp.where(a == 0, jnp.float32(1.0), nvfp4_tensor_scale(a))


def _block_scales(bamax, ts):
    b = true_divide(bamax, jnp.float32(6.0))
    if ts is None:
        s8 = jnp.clip(b, jnp.float32(2.0**-6), jnp.float32(448.0)).astype(jnp.float8_e4m3fn)
        rcp = jnp.float32(1.0) / s8.astype(jnp.float32)
    else:
        s8 = jnp.clip(true_divide(b, ts), jnp.float32(2.0**-6), jnp.float32(448.0)).astype(jnp.float8_e4m3fn)
        rcp = (jnp.float32(1.0) / ts) / s8.astype(jnp.float32)
    return s8, rcp


def nvfp4_quantize(x, ts=None, u24=None, block=16):
    xb, n = _blocks(x, block)
    s8, rcp = _block_scales(jnp.max(jnp.abs(xb), axis=-1), ts)
    v = jnp.clip(xb * rcp[..., None], -6.0, 6.0)
    u = None if u24 is None else _blocks(u24.astype(jnp.float32), block)[0]
    return s8, _unblock(e2m1_codes(v, u), n)


def nvfp4_dequantize(s8, codes, ts=None, block=16):
    cb, n = _blocks(e2m1_value(codes), block)
    s = s8.astype(jnp.float32)
    if ts is not None:
        s = ts * s
    return _unblock(cb * s[..., None], n)


def nvfp4_quantize_2d(w, ts, tile=16):
    w = w.astype(jnp.float32)
    r, c = w.shape
    wp = jnp.pad(w, ((0, (-r) % tile), (0, (-c) % tile)))
    t = wp.reshape(wp.shape[0] // tile, tile, wp.shape[1] // tile, tile)
    s8, rcp = _block_scales(jnp.max(jnp.abs(t), axis=(1, 3)), ts)
    full = jnp.repeat(jnp.repeat(rcp, tile, 0), tile, 1)
    return s8, e2m1_codes(jnp.clip(wp * full, -6.0, 6.0))[:r, :c]


def nvfp4_dequantize_2d(s8, codes, ts, tile=16):
    r, c = codes.shape
    s = ts * s8.astype(jnp.float32)
    return e2m1_value(codes) * jnp.repeat(jnp.repeat(s, tile, 0), tile, 1)[:r, :c]


def sr_uniform24(seed, stream, shape):
    """The reference's counter-based hash in uint32 arithmetic (wrapping = masked)."""
    n = int(np.prod(shape, dtype=np.int64))
    i = jnp.arange(n, dtype=jnp.uint32)
    seed = jnp.asarray(seed).astype(jnp.uint32)
    stream = jnp.asarray(stream).astype(jnp.uint32)
    key = seed * jnp.uint32(0x9E3779B1) + stream * jnp.uint32(0x85EBCA77)
    h = i * jnp.uint32(0x27D4EB2F) + key
    for mul in (0x7FEB352D, 0x846CA68B):
        h = h ^ (h >> 16)
        h = h * jnp.uint32(mul)
    h = h ^ (h >> 16)
    return (h >> 8).reshape(tuple(shape))


def rht_signs(seed):
    u = sr_uniform24(seed, 0x5167, (16,))
    return jnp.where((u & 1) != 0, jnp.float32(-1.0), jnp.float32(1.0))


def hadamard16(x, signs):
    x = x.astype(jnp.float32)
    pad = (-x.shape[0]) % 16
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], jnp.float32)], axis=0)
    rest = x.shape[1:]
    g = x.reshape((x.shape[0] // 16, 16) + rest) * signs.reshape((1, 16) + (1,) * len(rest))
    h = 1
    while h < 16:
        g = g.reshape((g.shape[0], 16 // (2 * h), 2, h) + rest)
        a, b = g[:, :, 0], g[:, :, 1]
        g = jnp.stack([a + b, a - b], axis=2)
        h *= 2
    return g.reshape(x.shape) * jnp.float32(0.25)


def layer_seed(path: str) -> int:
    """The initial seed of the layer at ``path``: CRC-32 of the dotted path, 31 bits (torch's)."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def _dot_f32(a, b):
    return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


#: the float32 GEMM of dequantized operands, left as written by autocast (not rounded to the
#: compute dtype: the layer rounds its output once)
_mm = as_written(_dot_f32)


def block_linear_parts(x, w, g, recipe: FP8Recipe, seed=0, step=0):
    """As `dualprec_torch.blockscale.block_linear_parts` (same names, same numbers)."""
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    out = {}
    s = recipe.scaling
    if s in ("rowwise", "rowwise_with_gw_hp"):
        hp = s == "rowwise_with_gw_hp"

        def rq(t, axis, name):
            sc = rowwise_scale(t, axis)
            q = quantize_scaled(t, sc)
            out[f"{name}_q"], out[f"{name}_s"] = q, sc
            return dequantize_scaled(q, sc)

        out["y"] = _mm(rq(x, -1, "x"), rq(w, -1, "w").T)
        if g is None:
            return out
        g = g.astype(jnp.float32)
        out["dx"] = _mm(rq(g, -1, "g"), rq(w, None if hp else 0, "w_gi"))
        out["dw"] = _mm(g.T, x) if hp else _mm(rq(g, 0, "g_gw").T, rq(x, 0, "x_gw"))
        return out
    if s == "mxfp8":
        rnd = recipe.rounding
        gfmt = "float8_e5m2" if recipe.format == "hybrid" else "float8_e4m3fn"

        def mq(t, name, fmt="float8_e4m3fn"):
            sc, q = mx_quantize(t, rnd, fmt)
            out[f"{name}_s"], out[f"{name}_q"] = sc, q
            return mx_dequantize(sc, q)

        out["y"] = _mm(mq(x, "x"), mq(w, "w").T)
        if g is None:
            return out
        g = g.astype(jnp.float32)
        out["dx"] = _mm(mq(g, "g", gfmt), mq(w.T, "wt").T)
        out["dw"] = _mm(mq(g.T, "gt", gfmt), mq(x.T, "xt").T)
        return out
    if s == "nvfp4":
        def nq(t, name, u24=None):
            ts = _training_tensor_scale(t)
            s8, c = nvfp4_quantize(t, ts, u24)
            out[f"{name}_ts"], out[f"{name}_s"], out[f"{name}_q"] = ts, s8, c
            return nvfp4_dequantize(s8, c, ts)

        xd = nq(x, "x")
        wtd = None
        if recipe.weight_blocks == "16x16":
            ts = _training_tensor_scale(w)
            s8, c = nvfp4_quantize_2d(w, ts)
            out["w_ts"], out["w_s"], out["w_q"] = ts, s8, c
            wd = nvfp4_dequantize_2d(s8, c, ts)
            wtd = wd.T
        else:
            wd = nq(w, "w")
        out["y"] = _mm(xd, wd.T)
        if g is None:
            return out
        g = g.astype(jnp.float32)
        gd = nq(g, "g", sr_uniform24(seed, 2 * step, g.shape) if recipe.sr else None)
        if wtd is None:
            wtd = nq(w.T, "wt")
        out["dx"] = _mm(gd, wtd.T)
        gt, xt = g, x
        if recipe.rht:
            signs = rht_signs(seed)
            gt, xt = hadamard16(g, signs), hadamard16(x, signs)
        gtd = nq(gt.T, "gt", sr_uniform24(seed, 2 * step + 1, gt.T.shape) if recipe.sr else None)
        out["dw"] = _mm(gtd, nq(xt.T, "xt").T)
        return out
    raise ValueError(f"block_linear_parts takes a block-scaled recipe, got fp8={s}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _block_linear(x2d, w, recipe, seed, step):
    return block_linear_parts(x2d, w, None, recipe)["y"]


def _fwd(x2d, w, recipe, seed, step):
    return _block_linear(x2d, w, recipe, seed, step), (x2d, w, seed, step)


def _bwd(recipe, res, gy):
    x2d, w, seed, step = res
    parts = block_linear_parts(x2d, w, gy, recipe, seed, step)
    zero = lambda v: np.zeros(np.shape(v), jax.dtypes.float0)  # noqa: E731 (integer state)
    return parts["dx"].astype(x2d.dtype), parts["dw"].astype(w.dtype), zero(seed), zero(step)


_block_linear.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("recipe",))
def _block_linear_jit(x2d, w, recipe, seed, step):
    return _block_linear(x2d, w, recipe, seed, step)


#: `block_linear_parts` compiled once per recipe (eager dispatch of its many small ops is slow)
block_linear_parts_jit = jax.jit(block_linear_parts, static_argnames=("recipe",))


def block_linear(x, w, recipe: FP8Recipe, seed=0, step=0):
    """``x @ w.T`` under a block-scaled recipe (float32 result), differentiable; ``w`` is the
    parameter as stored (N, K).  ``seed``/``step``: the precision state (ints or int32 arrays)."""
    if not (isinstance(recipe, FP8Recipe) and recipe.block_scaled):
        raise TypeError(f"block_linear needs a block-scaled FP8Recipe, got {recipe!r}")
    lead = x.shape[:-1]
    y = _block_linear_jit(x.reshape(-1, x.shape[-1]), w, recipe, jnp.asarray(seed, jnp.int32),
                          jnp.asarray(step, jnp.int32))
    return y.reshape(lead + (w.shape[0],))


# ----------------------------------------------------------------------------- Flax linen
#: the variable (in the FP8 collection) holding a layer's [seed high 16 bits, seed low 16 bits,
#: step] as float32 (exact: each part < 2**24); its "gradient" is its next value
STATE_KEY = "blockscale_state"


def _state_init(seed: int):
    return jnp.asarray([seed >> 16, seed & 0xFFFF, 0], jnp.float32)


def _seed_step(state):
    s = state.astype(jnp.int32)
    return s[0] * 65536 + s[1], s[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _state_dot(x2d, w, state, recipe):
    return block_linear_parts(x2d, w, None, recipe)["y"]


def _state_fwd(x2d, w, state, recipe):
    return _state_dot(x2d, w, state, recipe), (x2d, w, state)


def _state_bwd(recipe, res, gy):
    x2d, w, state = res
    from .fp8 import _to_f32

    st = _to_f32(state)
    seed, step = _seed_step(st)
    parts = block_linear_parts(x2d, w, gy, recipe, seed, step)
    nxt = (st + jnp.asarray([0, 0, 1], jnp.float32))
    if nxt.dtype != state.dtype:
        nxt = lax.convert_element_type(nxt, state.dtype)
    return parts["dx"].astype(x2d.dtype), parts["dw"].astype(w.dtype), nxt


_state_dot.defvjp(_state_fwd, _state_bwd)


try:
    import flax.linen as nn

    class BlockDotGeneral(nn.Module):
        """``dot_general_cls`` of an nn.Dense under a block-scaled recipe: the input as the
        layer received it and the stored kernel (docs/fp8.md's rule), the recipe's three GEMMs,
        the state [seed, step] in the FP8 collection (Flax's ``_overwrite_with_gradient``:
        differentiate and apply it as for delayed scaling, `dualprec_jax.fp8.apply_fp8_grads`)."""

        recipe: FP8Recipe
        layer: str = ""

        @nn.compact
        def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
            from . import fp8

            dims = fp8._freeze(dimension_numbers)
            if dims != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
                raise fp8.UnsupportedPolicyError(
                    f"fp8={self.recipe.scaling}: block-scaled layers take nn.Dense (one contracting axis); "
                    f"{self.layer or 'this layer'} has dimension numbers {dims}")
            state = self.variable(fp8.FP8_COLLECTION, STATE_KEY, lambda: _state_init(layer_seed(self.layer))).value
            x = fp8._input_source(lhs)
            w = fp8._weight_source(rhs)
            lead = x.shape[:-1]
            y = _state_dot(x.reshape(-1, x.shape[-1]), w.T, state, self.recipe)
            return y.reshape(lead + (w.shape[1],))

except ImportError:  # pragma: no cover
    BlockDotGeneral = None
