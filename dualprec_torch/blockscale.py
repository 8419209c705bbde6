"""Block-scaled and row-wise low-precision linear layers for torch, emulated exactly.

The recipes of `dualprec.ref.blockscale` (docs/block-scaling.md): ``rowwise`` /
``rowwise_with_gw_hp`` (torchao's), ``mxfp8`` (E8M0 scales over 32, four roundings) and
``nvfp4`` (E2M1 codes, E4M3 scales over 16, float32 tensor scale, 16x16 weight tiles,
stochastic rounding of gradients, random Hadamard transform).  Every scale and code is computed
with the reference's operations (bit manipulation, elementwise float32 arithmetic, maxima), so
they equal the reference's and the JAX backend's bit for bit; the GEMMs multiply the
dequantized float32 operands (emulation: no block-scaled tensor-core GEMM runs here, on any
device).  Outputs therefore agree with the reference within float32 summation-order bounds.

State: `BlockScaledLinear` keeps ``blockscale_state`` (int64 ``[seed, step]``, in its state
dict).  Stochastic rounding draws ``sr_uniform24(seed, 2*step + k)``; the Hadamard signs are
``rht_signs(seed)``; a backward increments ``step``.  A resumed run (or the JAX backend given the
same seed and step) draws the same bits.

Not here: ``torch._scaled_mm`` block-scaled GEMMs (Blackwell, MX/NVFP4) and the row-wise
``_scaled_mm`` path (Hopper); no GPU was available to this work.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from dualprec.policy import FP8Recipe

__all__ = ["floor_pow2", "rowwise_scale", "quantize_scaled", "dequantize_scaled", "mx_quantize",
           "mx_dequantize", "e2m1_codes", "e2m1_value", "nvfp4_tensor_scale", "nvfp4_quantize",
           "nvfp4_dequantize", "nvfp4_quantize_2d", "nvfp4_dequantize_2d", "sr_uniform24", "rht_signs",
           "hadamard16", "block_linear_parts", "block_linear", "BlockScaledLinear", "layer_seed"]


def layer_seed(path: str) -> int:
    """The initial seed of the layer at ``path`` (CRC-32 of the dotted path, 31 bits): the same
    in both backends and in every run, so a fresh run draws reproducible SR/Hadamard bits."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF

_F8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_ELEM_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
_MAX_POW2 = {"float8_e4m3fn": 8, "float8_e5m2": 15}
_MBITS = {"float8_e4m3fn": 3, "float8_e5m2": 2}
_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_M32 = 0xFFFFFFFF


def _bits(x):
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)


def _from_bits(b):
    """float32 from bit patterns held in int64 (0 <= b < 2**32)."""
    b = b & _M32
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def floor_pow2(s):
    """The largest power of two <= s, from the bits (normal s; NaN, inf, 0 kept)."""
    s = s.to(torch.float32)
    b = _bits(s) & 0x7FFFFFFF
    out = _from_bits(b & ~0x7FFFFF)
    out = torch.where(torch.isnan(s) | torch.isinf(s) | (s == 0), s.abs(), out)
    return torch.copysign(out, s)


# ----------------------------------------------------------------------------- row-wise
def rowwise_scale(x, axis, fmt="float8_e4m3fn", reduce=None):
    """``reduce``: the data-parallel reduction of the amax (a max over the ranks holding other
    rows of the same tensor; `block_linear_parts` passes it for amaxes over the batch)."""
    a = x.to(torch.float32).abs()
    a = a.amax() if axis is None else a.amax(dim=axis, keepdim=True)
    if reduce is not None:
        a = reduce(a)
    a64 = a.to(torch.float64)
    s = (_ELEM_MAX[fmt] / torch.where(torch.isnan(a64), a64, a64.clamp(min=1e-12))).to(torch.float32)
    return floor_pow2(s)


def quantize_scaled(x, scale, fmt="float8_e4m3fn"):
    m = _ELEM_MAX[fmt]
    return (x.to(torch.float32) * scale).clamp(-m, m).to(_F8[fmt])


def dequantize_scaled(q, scale):
    return q.to(torch.float32) / scale


# ----------------------------------------------------------------------------- blocks
def _blocks(x, block):
    x = x.to(torch.float32)
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block), n


def _unblock(xb, n):
    return xb.reshape(*xb.shape[:-2], -1)[..., :n]


def mx_scale_exponent(amax, rounding="rceil", fmt="float8_e4m3fn"):
    a = amax.to(torch.float32)
    nan = torch.isnan(a)
    if rounding == "rceil":
        d = a / _ELEM_MAX[fmt]
        b = _bits(d) & 0x7FFFFFFF
        e, m = b >> 23, b & 0x7FFFFF
        c = torch.where(e == 0, torch.full_like(e, -127), e - 127 + (m != 0).to(torch.int64))
        biased = c.clamp(-127, 127) + 127
        biased = torch.where(torch.isinf(d), torch.full_like(biased, 254), biased)
        return torch.where(nan, torch.full_like(biased, 255), biased).to(torch.uint8)
    b = _bits(a)
    if rounding == "even":
        b = (b + (1 << (23 - _MBITS[fmt] - 1))) & (0x1FF << 23)
    pow2 = ((b >> 23) & 0xFF) - 127
    if rounding == "ceil":
        pow2 = pow2 + ((b & 0x7FFFFF) > 0).to(torch.int64)
    elif rounding not in ("floor", "even"):
        raise ValueError(f"rounding must be one of rceil, floor, ceil, even; got {rounding!r}")
    biased = (pow2 - _MAX_POW2[fmt]).clamp(-127, 128) + 127
    return torch.where(nan, torch.full_like(biased, 255), biased).to(torch.uint8)


def _pow2_of_biased(biased):
    """2**(biased - 127) as float32 (biased in [0, 254])."""
    e = biased.to(torch.int64)
    normal = _from_bits(e.clamp(min=1) << 23)
    sub = torch.full_like(normal, 2.0**-127)
    return torch.where(e == 0, sub, normal)


def mx_quantize(x, rounding="rceil", fmt="float8_e4m3fn", block=32):
    """(biased E8M0 scales as uint8, float8 codes) along the last axis (the reference's rules)."""
    xb, n = _blocks(x, block)
    biased = mx_scale_exponent(xb.abs().amax(dim=-1), rounding, fmt)
    e = biased.to(torch.int64)
    if rounding == "rceil":
        rcp = _pow2_of_biased((254 - e).clamp(0, 254))  # 2**(127 - e)
        rcp = torch.where(e == 0, torch.ones_like(rcp), rcp)
        rcp = torch.where(e == 254, torch.full_like(rcp, 2.0**-127), rcp)
        rcp = torch.where(e == 255, torch.full_like(rcp, float("nan")), rcp)
        scaled = xb * rcp[..., None]
    else:
        s = torch.where(e == 255, torch.full_like(xb[..., 0], float("inf")), _from_bits(e.clamp(max=254) << 23))
        s = s.clamp(min=2.0**-126)
        scaled = xb / s[..., None]
    m = _ELEM_MAX[fmt]
    codes = scaled.clamp(-m, m).to(_F8[fmt])
    return biased, _unblock(codes, n)


def mx_dequantize(biased, codes, block=32):
    cb, n = _blocks(codes.to(torch.float32), block)
    e = biased.to(torch.int64)
    s = torch.where(e == 255, torch.full(e.shape, float("nan")), _pow2_of_biased(e.clamp(max=254)))
    return _unblock(cb * s[..., None], n)


# ----------------------------------------------------------------------------- NVFP4
def e2m1_codes(v, u24=None):
    """E2M1 codes (uint8, sign in bit 3) of float32 values clamped to [-6, 6]: nearest even
    (thresholds with the ties placed on the even side), or stochastic with ``u24``."""
    nan = torch.isnan(v)
    mag = torch.where(nan, torch.zeros_like(v), v.abs())
    sign = torch.signbit(v)
    if u24 is None:
        idx = ((mag > 0.25).to(torch.int64) + (mag >= 0.75) + (mag > 1.25) + (mag >= 1.75)
               + (mag > 2.5) + (mag >= 3.5) + (mag > 5.0))
    else:
        grid = torch.tensor(_GRID, dtype=torch.float32)
        idx = (torch.searchsorted(grid, mag, right=True) - 1).clamp(0, 7)
        lo, hi = grid[idx], grid[(idx + 1).clamp(max=7)]
        gap = torch.where(hi > lo, hi - lo, torch.ones_like(lo))
        thresh = (mag - lo) * (2.0**24 / gap)
        up = (u24.to(torch.float32) < thresh) & (hi > lo)
        idx = idx + up.to(torch.int64)
    idx = torch.where(nan, torch.full_like(idx, 3), idx)
    return (idx | (sign.to(torch.int64) << 3)).to(torch.uint8)


def e2m1_value(codes):
    c = codes.to(torch.int64)
    grid = torch.tensor(_GRID, dtype=torch.float32)
    return torch.where((c & 8) != 0, -1.0, 1.0) * grid[c & 7]


def nvfp4_tensor_scale(amax):
    return amax.to(torch.float32) / 2688.0


def _training_tensor_scale(t, reduce=None):
    a = t.to(torch.float32).abs().amax() if t.numel() else torch.zeros((), dtype=torch.float32)
    if reduce is not None:
        a = reduce(a)
    return torch.where(a == 0, torch.ones_like(a), nvfp4_tensor_scale(a))


def _block_scales(bamax, ts):
    bs_ = bamax / 6.0
    if ts is None:
        s8 = bs_.clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn)
        rcp = 1.0 / s8.to(torch.float32)
    else:
        s8 = (bs_ / ts).clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn)
        rcp = (1.0 / ts) / s8.to(torch.float32)
    return s8, rcp


def nvfp4_quantize(x, ts=None, u24=None, block=16):
    xb, n = _blocks(x, block)
    s8, rcp = _block_scales(xb.abs().amax(dim=-1), ts)
    v = (xb * rcp[..., None]).clamp(-6.0, 6.0)
    u = None if u24 is None else _blocks(u24.to(torch.float32), block)[0]
    return s8, _unblock(e2m1_codes(v, u), n)


def nvfp4_dequantize(s8, codes, ts=None, block=16):
    cb, n = _blocks(e2m1_value(codes), block)
    s = s8.to(torch.float32)
    if ts is not None:
        s = ts * s
    return _unblock(cb * s[..., None], n)


def nvfp4_quantize_2d(w, ts, tile=16):
    w = w.to(torch.float32)
    r, c = w.shape
    wp = torch.nn.functional.pad(w, (0, (-c) % tile, 0, (-r) % tile))
    t = wp.reshape(wp.shape[0] // tile, tile, wp.shape[1] // tile, tile)
    s8, rcp = _block_scales(t.abs().amax(dim=(1, 3)), ts)
    full = rcp.repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    v = (wp * full).clamp(-6.0, 6.0)
    return s8, e2m1_codes(v)[:r, :c]


def nvfp4_dequantize_2d(s8, codes, ts, tile=16):
    r, c = codes.shape
    s = ts * s8.to(torch.float32)
    full = s.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:r, :c]
    return e2m1_value(codes) * full


def sr_uniform24(seed: int, stream: int, shape):
    """The reference's counter-based hash, in int64 arithmetic masked to 32 bits."""
    n = 1
    for d in shape:
        n *= int(d)
    i = torch.arange(n, dtype=torch.int64)
    key = (int(seed) * 0x9E3779B1 + int(stream) * 0x85EBCA77) & _M32
    h = (i * 0x27D4EB2F + key) & _M32
    for mul in (0x7FEB352D, 0x846CA68B):
        h = h ^ (h >> 16)
        h = (h * mul) & _M32
    h = h ^ (h >> 16)
    return (h >> 8).reshape(tuple(shape))


def rht_signs(seed: int):
    u = sr_uniform24(seed, 0x5167, (16,))
    return torch.where((u & 1) != 0, -1.0, 1.0).to(torch.float32)


def hadamard16(x, signs):
    x = x.to(torch.float32)
    pad = (-x.shape[0]) % 16
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))], dim=0)
    rest = tuple(x.shape[1:])
    g = x.reshape((x.shape[0] // 16, 16) + rest) * signs.reshape((1, 16) + (1,) * len(rest))
    h = 1
    while h < 16:
        g = g.reshape((g.shape[0], 16 // (2 * h), 2, h) + rest)
        a, b = g[:, :, 0], g[:, :, 1]
        g = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return g.reshape(x.shape) * 0.25


# ----------------------------------------------------------------------------- data parallel
class _DataParallel:
    """The batch (rows of ``x`` and ``g``) split evenly over the ranks of ``group``; the weight
    whole on every rank (FSDP2 gathers it before the layer runs).  What the unsharded run
    computes over the batch is reduced here so that every code and scale equals its:

    * an amax over the batch (a row-wise column scale of the weight-gradient GEMM, the NVFP4
      tensor scale of x, g and their transposes) is all-reduced with MAX over ``group``;
    * a block along the batch (MX/NVFP4 blocks of the transposed operands, the 16-row Hadamard
      groups) must lie on one rank: the local batch must be a multiple of the block;
    * stochastic-rounding bits are drawn at the element's index in the global tensor.
    Block scales over the contracting features and the weight's scales need nothing."""

    def __init__(self, group, rows: int):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.rows = rows

    def amax(self, a):
        a = a.clone()
        self.dist.all_reduce(a, op=self.dist.ReduceOp.MAX, group=self.group)
        return a

    def require_blocks(self, block: int, what: str):
        if self.rows % block:
            raise ValueError(f"{what} under data parallelism: the local batch has {self.rows} rows, not a "
                             f"multiple of the {block}-element blocks along it; use a per-rank batch that is")

    def sr(self, seed, stream, shape, batch_axis: int):
        full = list(shape)
        full[batch_axis] = self.rows * self.world
        u = sr_uniform24(seed, stream, full)
        return u.narrow(batch_axis, self.rank * self.rows, self.rows)


def _data_parallel(group, rows):
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return _DataParallel(group, rows)


# ----------------------------------------------------------------------------- the GEMMs
def block_linear_parts(x, w, g, recipe: FP8Recipe, seed: int = 0, step: int = 0, *, backward=True, group=None):
    """The reference's ``*_linear`` for ``recipe``: a dict of every GEMM operand's codes and
    scales (names as in `dualprec.ref.blockscale`) and the float32 results y (and, with ``g``,
    dx and dw), each GEMM on the dequantized float32 operands.  ``group``: the data-parallel
    process group over which the batch is split (see `_DataParallel`; None: unsharded)."""
    x, w = x.to(torch.float32), w.to(torch.float32)
    out = {}
    s = recipe.scaling
    dp = _data_parallel(group, x.shape[0])
    red = dp.amax if dp is not None else None
    if s in ("rowwise", "rowwise_with_gw_hp"):
        hp = s == "rowwise_with_gw_hp"

        def rq(t, axis, name, batch=False):
            sc = rowwise_scale(t, axis, reduce=red if batch else None)
            q = quantize_scaled(t, sc)
            out[f"{name}_q"], out[f"{name}_s"] = q, sc
            return dequantize_scaled(q, sc)

        out["y"] = rq(x, -1, "x") @ rq(w, -1, "w").T
        if g is None:
            return out
        g = g.to(torch.float32)
        out["dx"] = rq(g, -1, "g") @ rq(w, None if hp else 0, "w_gi")
        out["dw"] = g.T @ x if hp else rq(g, 0, "g_gw", True).T @ rq(x, 0, "x_gw", True)
        return out
    if s == "mxfp8":
        rnd = recipe.rounding
        gfmt = "float8_e5m2" if recipe.format == "hybrid" else "float8_e4m3fn"

        def mq(t, name, fmt="float8_e4m3fn"):
            sc, q = mx_quantize(t, rnd, fmt)
            out[f"{name}_s"], out[f"{name}_q"] = sc, q
            return mx_dequantize(sc, q)

        out["y"] = mq(x, "x") @ mq(w, "w").T
        if g is None:
            return out
        if dp is not None:
            dp.require_blocks(32, "mxfp8")
        g = g.to(torch.float32)
        out["dx"] = mq(g, "g", gfmt) @ mq(w.T.contiguous(), "wt").T
        out["dw"] = mq(g.T.contiguous(), "gt", gfmt) @ mq(x.T.contiguous(), "xt").T
        return out
    if s == "nvfp4":
        def nq(t, name, u24=None, batch=True):
            ts = _training_tensor_scale(t, red if batch else None)
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
            wd = nq(w, "w", batch=False)
        out["y"] = xd @ wd.T
        if g is None:
            return out
        if dp is not None:
            dp.require_blocks(16, "nvfp4")
        g = g.to(torch.float32)

        def u24(stream, shape, batch_axis):
            if not recipe.sr:
                return None
            return sr_uniform24(seed, stream, shape) if dp is None else dp.sr(seed, stream, shape, batch_axis)

        gd = nq(g, "g", u24(2 * step, g.shape, 0))
        if wtd is None:
            wtd = nq(w.T.contiguous(), "wt", batch=False)
        out["dx"] = gd @ wtd.T
        gt, xt = g, x
        if recipe.rht:
            signs = rht_signs(seed)
            gt, xt = hadamard16(g, signs), hadamard16(x, signs)
        gtt = gt.T.contiguous()
        gtd = nq(gtt, "gt", u24(2 * step + 1, gtt.shape, 1))
        out["dw"] = gtd @ nq(xt.T.contiguous(), "xt").T
        return out
    raise ValueError(f"block_linear_parts takes a block-scaled recipe, got fp8={s}")


class _BlockLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, recipe, state, group):
        ctx.save_for_backward(x2d, weight)
        ctx.recipe, ctx.state, ctx.group = recipe, state, group
        return block_linear_parts(x2d, weight, None, recipe, group=group)["y"]

    @staticmethod
    def backward(ctx, gy):
        x2d, weight = ctx.saved_tensors
        state = ctx.state
        seed, step = int(state[0]), int(state[1])
        parts = block_linear_parts(x2d, weight, gy, ctx.recipe, seed, step, group=ctx.group)
        with torch.no_grad():
            state[1] += 1  # one recipe step per backward: the next draws fresh SR bits
        return parts["dx"].to(x2d.dtype), parts["dw"].to(weight.dtype), None, None, None


def block_linear(x, weight, recipe: FP8Recipe, state, group=None):
    """``x @ weight.T`` under a block-scaled recipe (float32 result); ``state`` is the int64
    ``[seed, step]`` tensor a backward advances; ``group``: the data-parallel group the batch
    is split over (`block_linear_parts`)."""
    lead = x.shape[:-1]
    y = _BlockLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, recipe, state, group)
    return y.reshape(*lead, weight.shape[0])


#: the attribute `dualprec_torch.sharding.shard` sets on each linear layer it shards: the
#: data-parallel process group whose ranks split the batch (block_linear_parts' ``group``)
DP_GROUP_ATTR = "_dualprec_dp_group"


class BlockScaledLinear(nn.Linear):
    """`nn.Linear` whose three GEMMs follow a block-scaled recipe (emulated; see the module
    docstring).  The weight is quantized from the parameter itself (its own dtype, float32
    master weights included); the output is in the input's dtype (the autocast dtype inside
    an autocast), the bias added in that dtype."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 recipe: FP8Recipe, seed: int = 0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_block(recipe, seed)

    @classmethod
    def convert(cls, *args, **kwargs):
        """Removed: it changed the Linear in place. Raises, naming `from_linear`."""
        raise TypeError("BlockScaledLinear.convert(linear) changed the layer in place and is gone: "
                        "layer = BlockScaledLinear.from_linear(linear, recipe, seed) returns a new layer around "
                        "the same Parameters (put it where the Linear was), or use "
                        "dualprec_torch.fp8.convert_module(model, policy)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe, seed: int = 0) -> "BlockScaledLinear":
        """A new BlockScaledLinear built around ``linear``'s Parameters (the same objects),
        returned; ``linear`` itself is left as it is.  The caller puts the new layer where
        ``linear`` was (`dualprec_torch.fp8.convert_module` does); see
        `dualprec_torch.fp8.new_layer_from` for what the new layer takes over."""
        from .fp8 import new_layer_from

        new = new_layer_from(cls, linear)
        new._init_block(recipe, seed)
        return new

    def _init_block(self, recipe, seed):
        if not (isinstance(recipe, FP8Recipe) and recipe.block_scaled):
            raise TypeError(f"BlockScaledLinear needs a block-scaled FP8Recipe, got {recipe!r}")
        self.recipe = recipe
        self.register_buffer("blockscale_state", torch.tensor([int(seed), 0], dtype=torch.int64))

    def forward(self, x):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            # the GEMM's float32 result, the bias (in the compute dtype) added in float32, one
            # rounding to the output dtype: the FP8 rule of docs/fp8.md, as FP8Linear and JAX
            y = block_linear(x, self.weight, self.recipe, self.blockscale_state,
                             getattr(self, DP_GROUP_ATTR, None))
            if self.bias is not None:
                y = y + self.bias.to(dtype).to(torch.float32)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.scaling}"
