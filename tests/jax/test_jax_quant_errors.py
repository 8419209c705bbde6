"""Bad input to dualprec_jax.quant: each error names what is wrong and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec import PolicyError
from dualprec_jax import Precision, quant


def test_unsupported_block_size_lists_the_supported_ones():
    with pytest.raises(quant.QuantizationError, match=r"blocksize 100 .*32, 64, 128"):
        quant.quantize_4bit(jnp.ones(128), "nf4", 100)
    with pytest.raises(PolicyError, match="blocksize 100 is not supported"):
        Precision("quant=nf4(blocksize=100)")
    with pytest.raises(quant.QuantizationError, match="quant_type"):
        quant.quantize_4bit(jnp.ones(128), "int4")


def test_odd_element_count_is_padded_in_uint8_and_refused_in_wider_storage():
    w = jax.random.normal(jax.random.key(0), (3, 7))  # 21 codes: 11 bytes, the last half padding
    params = quant.quantize_params({"fc": {"kernel": w.T, "bias": jnp.zeros(3)}}, "quant=nf4")
    assert params["fc"]["qweight"]["weight"].shape == (11, 1)
    deq = quant.dequantize_4bit(params["fc"]["qweight"], "nf4", 64, (3, 7))
    assert float(jnp.abs(deq - w).max()) < 0.2 * float(jnp.abs(w).max())
    assert quant.to_bnb_state_dict(params, "quant=nf4")["fc.weight"].shape == (11, 1)
    with pytest.raises(quant.QuantizationError, match=r"11 packed bytes .*bfloat16.*quant_storage='uint8'"):
        quant.to_bnb_state_dict(params, "quant=nf4", quant_storage="bfloat16")


def test_wider_storage_loads_back():
    w = jax.random.normal(jax.random.key(0), (4, 64))
    float_params = {"fc": {"kernel": w.T, "bias": jnp.zeros(4)}}
    params = quant.quantize_params(float_params, "quant=nf4-dq")
    tensors = quant.to_bnb_state_dict(params, "quant=nf4-dq", quant_storage="float32")
    assert tensors["fc.weight"].dtype == np.float32
    back = quant.from_bnb_state_dict(tensors, float_params, "quant=nf4-dq")
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_float64_policy_with_4bit_quantization_is_refused():
    with pytest.raises(PolicyError, match="float64"):
        Precision("64-true,quant=nf4")


def test_nonfinite_weight_is_refused_before_quantizing():
    kernel = jnp.ones((64, 4)).at[3, 1].set(jnp.nan)
    with pytest.raises(quant.QuantizationError, match="NaN or inf"):
        quant.quantize_params({"fc": {"kernel": kernel}}, "quant=nf4")


def test_dequantize_with_the_wrong_shape_names_both_sizes():
    q = quant.quantize_4bit(jnp.ones((4, 64)), "nf4", 64)
    with pytest.raises(quant.QuantizationError, match=r"does not hold shape \(8, 64\).*needs 256 uint8 bytes"):
        quant.dequantize_4bit(q, "nf4", 64, (8, 64))


def test_params_quantized_under_another_policy_are_refused():
    params = quant.quantize_params({"fc": {"kernel": jnp.ones((64, 4)), "bias": jnp.zeros(4)}}, "quant=nf4")
    with pytest.raises(quant.QuantizationError, match="policy says otherwise"):
        quant.to_bnb_state_dict(params, "32-true")
    with pytest.raises(quant.QuantizationError, match="adapter"):
        lora = quant.quantize_params({"fc": {"kernel": jnp.ones((64, 4)), "bias": jnp.zeros(4)}}, "quant=nf4",
                                     lora_rank=2, rng=jax.random.key(0))
        quant.to_bnb_state_dict(lora, "quant=nf4")
