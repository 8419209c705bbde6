"""Block-scaled recipes under sharded jit (tests/jax/test_jax_blockscale_sharding.py), in a
process of its own with 4 host devices.  Prints one "OK <recipe> <what>" per check.

Sharded jit keeps the global semantics of the program: an amax over the batch (a row-wise
column scale, the NVFP4 tensor scale of an activation or gradient) is a reduction over the
sharded axis, which XLA's partitioner completes with a cross-device max; a block scale is
computed within its block wherever the block lies.  So the codes and scales must equal the
unsharded run's bit for bit."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from dualprec import FP8Recipe  # noqa: E402
from dualprec_jax import blockscale as bs  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
MESH = Mesh(np.array(jax.devices()), ("data",))
RECIPES = {"rowwise": FP8Recipe("rowwise"), "rowwise_with_gw_hp": FP8Recipe("rowwise_with_gw_hp"),
           "mxfp8": FP8Recipe("mxfp8"), "mxfp8-floor": FP8Recipe("mxfp8", rounding="floor"),
           "nvfp4": FP8Recipe("nvfp4"), "nvfp4-1x16": FP8Recipe("nvfp4", sr=False, rht=False, weight_blocks="1x16")}


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 48)).astype(np.float32)  # 10 rows per device: blocks straddle devices
    x[13] *= np.float32(50.0)  # the batch amax lives on one device only
    w = (rng.standard_normal((24, 48)) * 0.05).astype(np.float32)
    g = (rng.standard_normal((40, 24)) * 1e-3).astype(np.float32)
    g[33, 5] = np.float32(0.5)  # as does the gradient's
    return x, w, g


def bits(v):
    a = np.asarray(v)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32) if a.dtype.itemsize == 4 else a


def main():
    x, w, g = data()
    rows, cols = NamedSharding(MESH, P("data", None)), NamedSharding(MESH, P("data", None))
    xs, gs = jax.device_put(x, rows), jax.device_put(g, rows)
    ws = jax.device_put(w, cols)  # FSDP: the weight sharded along its output features
    for name, recipe in RECIPES.items():
        ref = bs.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), recipe, 123, 2)
        got = bs.block_linear_parts_jit(xs, ws, gs, recipe, 123, 2)
        assert len(got["x_q"].sharding.device_set) == 4, got["x_q"].sharding
        codes = [k for k in ref if k not in ("y", "dx", "dw")]
        bad = [k for k in codes if not np.array_equal(bits(ref[k]), bits(got[k]))]
        assert not bad, f"{name}: {bad} differ sharded vs unsharded"
        print(f"OK {name} codes-and-scales ({len(codes)} tensors)")
        gt, xt = (g, x)
        if recipe.rht:
            signs = bs.rht_signs(123)
            gt, xt = np.asarray(bs.hadamard16(g, signs)), np.asarray(bs.hadamard16(x, signs))
        # |terms| of each float32 sum (x4: a dequantized operand is within a factor 2 of its
        # value); the per-device GEMMs may block their sums differently from the whole one
        mags = {"y": (np.abs(x).astype(np.float64) @ np.abs(w).T, x.shape[1]),
                "dx": (np.abs(g).astype(np.float64) @ np.abs(w), w.shape[0]),
                "dw": (np.abs(gt).T.astype(np.float64) @ np.abs(xt), x.shape[0])}
        for k, (mag, n) in mags.items():
            a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
            bound = 2 * n * np.finfo(np.float32).eps * 4 * mag
            assert np.all(np.abs(a - b) <= bound), (name, k, float(np.max(np.abs(a - b) - bound)))
        print(f"OK {name} outputs")
    # a training step of the differentiable layer: same state advance, same gradients
    for name in ("rowwise", "mxfp8", "nvfp4"):
        recipe = RECIPES[name]

        def loss(w_, x_, c_, recipe=recipe):
            return jnp.sum(bs.block_linear(x_, w_, recipe, 7, 3) * c_)

        grad = jax.jit(jax.grad(loss))
        c = jnp.asarray(g)
        ref = np.asarray(grad(jnp.asarray(w), jnp.asarray(x), c))
        got = np.asarray(grad(ws, xs, jax.device_put(g, rows)))
        gt, xt = (g, x)
        if recipe.rht:
            signs = bs.rht_signs(7)
            gt, xt = np.asarray(bs.hadamard16(g, signs)), np.asarray(bs.hadamard16(x, signs))
        bound = 2 * x.shape[0] * np.finfo(np.float32).eps * 4 * (np.abs(gt).T.astype(np.float64) @ np.abs(xt))
        assert np.all(np.abs(ref - got) <= bound), (name, float(np.max(np.abs(ref - got) - bound)))
        print(f"OK {name} layer-grad")


if __name__ == "__main__":
    main()
