"""dualprec_jax.quant codecs: NF4/FP4 (plain and double-quantized) and LLM.int8 codes, bit
for bit against dualprec.ref and bitsandbytes' CPU kernels; jit-able."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dualprec.dtypes import numpy_dtype
from dualprec.ref import dequantize_4bit as ref_dequantize_4bit
from dualprec.ref import int8_matmul as ref_int8_matmul
from dualprec.ref import int8_quantize_weight
from dualprec.ref import quantize_4bit as ref_quantize_4bit
from dualprec_jax import quant

_jit_quantize = jax.jit(quant.quantize_4bit, static_argnums=(1, 2, 3))


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _data(n, bs, dtype, seed):
    """Odd count, a partial last block, an all-zero block, block scales spanning e^+-5."""
    rng = np.random.default_rng(seed)
    nblocks = -(-n // bs)
    scale = np.repeat(np.exp(rng.uniform(-5, 5, nblocks)), bs)[:n]
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    x[bs: 2 * bs] = 0
    x[:4] = [1e-30, -1e-30, 3e4, -3e4]
    return x.astype(numpy_dtype(dtype))


def _assert_state_is_ref(q, packed, state):
    assert np.array_equal(np.asarray(q["weight"]), packed)
    assert np.array_equal(bits(q["absmax"]), bits(state.absmax))
    if state.double_quant:
        assert np.array_equal(bits(q["nested_absmax"]), bits(state.nested_absmax))
        assert bits(q["offset"]) == bits(np.float32(state.offset))
    else:
        assert "nested_absmax" not in q


# Every quant type with every dtype and with and without double quantization (6 of the 12
# combinations, to keep the suite fast; tests/ref covers all of them against bitsandbytes).
@pytest.mark.parametrize("qt,dtype,dq", [("nf4", "float32", False), ("nf4", "bfloat16", True),
                                         ("nf4", "float16", False), ("fp4", "float32", True),
                                         ("fp4", "bfloat16", False), ("fp4", "float16", True)])
def test_codes_absmax_and_dequantized_bits_equal_reference(qt, dtype, dq):
    bs = 64
    n = (300 if dq else 3) * bs + 37  # dq: the absmax vector spans two nested blocks
    x = _data(n, bs, dtype, seed=n)
    packed, state = ref_quantize_4bit(x, qt, bs, double_quant=dq)
    q = _jit_quantize(jnp.asarray(x), qt, bs, dq)
    _assert_state_is_ref(q, packed, state)
    ours = quant.dequantize_4bit(q, qt, bs, (n,), jnp.asarray(x).dtype)
    assert np.array_equal(bits(ours), bits(ref_dequantize_4bit(packed, state)))


def test_every_blocksize_matches_reference():
    for bs in (32, 256, 4096):  # 64 above; the reference tests cover them all
        x = _data(2 * bs + 5, bs, "float32", seed=bs)
        packed, state = ref_quantize_4bit(x, "nf4", bs)
        _assert_state_is_ref(quant.quantize_4bit(jnp.asarray(x), "nf4", bs), packed, state)


def test_dequantize_rounds_to_the_stored_dtype_first():
    """bitsandbytes dequantizes to quant_state.dtype and then casts: float16-quantized weights
    computed in bfloat16 are rounded twice, and so are ours."""
    x = _data(130, 64, "float16", seed=3)
    packed, state = ref_quantize_4bit(x, "nf4", 64)
    q = quant.quantize_4bit(jnp.asarray(x), "nf4", 64)
    ours = quant.dequantize_4bit(q, "nf4", 64, (130,), jnp.bfloat16, jnp.float16)
    assert np.array_equal(bits(ours), bits(ref_dequantize_4bit(packed, state).astype(ml_dtypes.bfloat16)))


def test_all_zero_partial_block_keeps_bitsandbytes_1e38():
    q = quant.quantize_4bit(jnp.zeros(100), "nf4", 64)
    assert bits(q["absmax"]).tolist() == [0, bits(np.float32(1e-38))]
    assert not np.asarray(quant.dequantize_4bit(q, "nf4", 64, (100,))).any()


def test_2d_weight_is_flattened_row_major_even_element_high_nibble():
    w = np.zeros((2, 64), np.float32)
    w[0, 0], w[0, 1] = 1.0, -1.0  # NF4: code 15 and code 0
    q = quant.quantize_4bit(jnp.asarray(w), "nf4", 64)
    assert q["weight"].shape == (64, 1) and q["weight"].dtype == jnp.uint8
    assert int(q["weight"][0, 0]) == 0xF0


class TestAgainstBitsandbytes:
    bnbF = pytest.importorskip("bitsandbytes.functional")
    torch = pytest.importorskip("torch")

    @pytest.mark.parametrize("shape,qt,dq", [((16, 64), "nf4", False), ((33, 50), "fp4", False),
                                             ((64, 300), "fp4", True)])
    def test_quantize_4bit_bits(self, shape, qt, dq):
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        qb, sb = self.bnbF.quantize_4bit(self.torch.from_numpy(x), blocksize=64, quant_type=qt,
                                         compress_statistics=dq)
        q = quant.quantize_4bit(jnp.asarray(x), qt, 64, dq)
        assert np.array_equal(np.asarray(q["weight"]), qb.numpy())
        assert np.array_equal(bits(q["absmax"]), bits(sb.absmax.numpy()))
        if dq:
            assert np.array_equal(bits(q["nested_absmax"]), bits(sb.state2.absmax.numpy()))
            assert bits(q["offset"]) == bits(np.float32(sb.offset.item()))
        # bitsandbytes' generic dequantize (a 1-D shape avoids its fused AVX512 path, which
        # is wrong for some row lengths: see tests/ref/test_ref_fourbit_bnb.py).
        sb.shape = self.torch.Size([x.size])
        theirs = self.bnbF.dequantize_4bit(qb, sb).numpy().reshape(shape)
        ours = np.asarray(quant.dequantize_4bit(q, qt, 64, shape))
        # Bit for bit, except that bitsandbytes' CPU kernel gives FP4's code 8 (the "-0"
        # pattern) as -0.0 where its codebook (and the reference) hold +0.0.
        nonzero = ours != 0
        assert np.array_equal(bits(ours[nonzero]), bits(theirs[nonzero])) and not theirs[~nonzero].any()

    def test_int8_codes_and_scb(self):
        # Seed 4 holds a weight where 127 / absmax and torch's reciprocal(absmax) * 127 differ.
        w = (np.random.default_rng(4).standard_normal((128, 64)) / 8).astype(np.float32)
        w[3] = 0.5
        cb, scb, _ = self.bnbF.int8_vectorwise_quant(self.torch.from_numpy(w).half())
        q = quant.quantize_int8(jnp.asarray(w))
        assert np.array_equal(np.asarray(q["weight"]), cb.numpy())
        assert np.array_equal(bits(q["SCB"]), bits(scb.numpy()))


def test_int8_codes_and_matmul_equal_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    w[3], w[5] = 0.5, 0.0  # ties round half to even; an all-zero row has SCB 0
    codes, scb = int8_quantize_weight(w)
    q = jax.jit(quant.quantize_int8)(jnp.asarray(w))
    assert np.array_equal(np.asarray(q["weight"]), codes) and np.array_equal(bits(q["SCB"]), bits(scb))
    x = rng.standard_normal((8, 40)).astype(np.float32)
    mm = jax.jit(quant.int8_matmul, static_argnums=3)
    # Without outliers every step is elementwise or exact integer: bit for bit.
    assert np.array_equal(bits(mm(jnp.asarray(x), q["weight"], q["SCB"], 6.0)), bits(ref_int8_matmul(x, codes, scb)))
    x[:, 5] *= 20  # outlier column: a float32 product, summed in XLA's order
    np.testing.assert_allclose(mm(jnp.asarray(x), q["weight"], q["SCB"], 6.0), ref_int8_matmul(x, codes, scb),
                               rtol=1e-6, atol=1e-5)


def test_int8_input_gradient_is_cotangent_times_dequantized_weight():
    w = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    q = quant.quantize_int8(jnp.asarray(w))
    x = jnp.ones((3, 8), jnp.float16)
    g = jax.jit(jax.grad(lambda x: quant.int8_matmul(x, q["weight"], q["SCB"], 6.0).sum()))(x)
    w_deq = np.asarray(quant.dequantize_int8(q, jnp.float16), np.float32)
    np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(w_deq.sum(0), (3, 8)).astype(np.float16))
