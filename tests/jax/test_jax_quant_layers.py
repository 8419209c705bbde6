"""Quantized Flax layers: linen QuantDense, Dense layers quantized by quantize_params and run
through Precision, nnx QuantLinear via Precision.setup; frozen weights, input gradients,
QLoRA adapters, skips, and the errors for misuse."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, D, H, NnxMLP, T
from flax import nnx

from dualprec_jax import Precision, quant

X = jax.random.normal(jax.random.key(1), (T, D), jnp.float32)


def _manual_dense(x, w_out_in, bias, compute):
    """The layer by hand: compute-dtype operands, float32 accumulation, bias in float32, one rounding."""
    y = jnp.dot(x.astype(compute), w_out_in.astype(compute).T, preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST)
    return (y + bias.astype(compute).astype(jnp.float32)).astype(compute)


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq"])
def test_quant_dense_is_dequantize_then_dense(mode):
    layer = quant.QuantDense(H, mode=mode, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), X)["params"]
    q = params["qweight"]
    assert q["weight"].dtype == jnp.uint8 and q["weight"].shape == (H * D // 2, 1)
    assert ("nested_absmax" in q) == mode.endswith("-dq")
    y = jax.jit(layer.apply)({"params": params}, X)
    w = quant.dequantize_4bit(q, mode[:3], 64, (H, D), jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(_manual_dense(X, w, params["bias"], jnp.bfloat16), np.float32))


def test_quant_dense_input_gradient_flows_weights_frozen():
    layer = quant.QuantDense(H, mode="nf4", lora_rank=2)
    params = layer.init(jax.random.key(0), X)["params"]
    trainable, frozen = quant.split_params(params)
    assert jax.tree.leaves(trainable["qweight"]) == [] and frozen["bias"] is None

    def loss(tr, x):
        return jnp.sum(layer.apply({"params": quant.merge_params(tr, frozen)}, x) ** 2)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, X)
    w = quant.dequantize_4bit(params["qweight"], "nf4", 64, (H, D))
    y = _manual_dense(X, w, params["bias"], jnp.float32)
    np.testing.assert_allclose(g_x, 2 * y @ w, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(g_params["lora_b"]).sum()) > 0  # B gets a gradient, A not yet (B = 0)
    assert not float(jnp.abs(g_params["lora_a"]).sum())


def test_qlora_training_moves_the_adapter_only():
    layer = quant.QuantDense(4, mode="nf4-dq", lora_rank=2, lora_alpha=4.0)
    params = layer.init(jax.random.key(0), X)["params"]
    trainable, frozen = quant.split_params(params)
    target = jnp.ones((T, 4))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(tr, opt):
        def loss(tr):
            return jnp.mean((layer.apply({"params": quant.merge_params(tr, frozen)}, X) - target) ** 2)
        val, g = jax.value_and_grad(loss)(tr)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, val

    opt = tx.init(trainable)
    losses = []
    for _ in range(5):
        trainable, opt, val = step(trainable, opt)
        losses.append(float(val))
    assert losses[-1] < losses[0]
    assert float(jnp.abs(trainable["lora_b"]).sum()) > 0
    merged = quant.merge_params(trainable, frozen)
    jax.tree.map(np.testing.assert_array_equal, merged["qweight"], params["qweight"])


@pytest.mark.parametrize("policy", ["bf16-mixed,quant=nf4-dq(skip=fc2)", "32-true,quant=fp4(blocksize=32)",
                                    "bf16-mixed,quant=int8", "bf16-mixed,quant=int8-training"])
def test_precision_quantizes_linen_dense_layers_by_policy(policy):
    prec = Precision(policy)
    variables = prec.init(MLP(), jax.random.key(0), X)
    p = variables["params"]
    frozen = not policy.endswith("training")
    assert ("qweight" in p["fc1"]) == frozen
    skipped = "skip=fc2" in policy
    assert ("kernel" in p["fc2"]) == (skipped or not frozen)
    y = jax.jit(lambda v, x: prec.apply(MLP(), v, x))(variables, X)
    assert y.dtype == jnp.float32 and y.shape == (T, D)
    # Close to the float model (quantization noise only).
    float_prec = Precision(policy.split(",quant")[0])
    float_vars = float_prec.init(MLP(), jax.random.key(0), X)
    y_float = float_prec.apply(MLP(), float_vars, X)
    assert float(jnp.abs(y - y_float).max()) < 0.3 * float(jnp.abs(y_float).max())


def test_quantize_params_skips_adds_lora_and_refuses_twice():
    params = MLP().init(jax.random.key(0), X)["params"]
    q = quant.quantize_params(params, "quant=nf4(skip=fc1)", lora_rank=2, rng=jax.random.key(3))
    assert "kernel" in q["fc1"] and "lora_a" not in q["fc1"]
    assert q["fc2"]["lora_a"].shape == (H, 2) and q["fc2"]["lora_b"].shape == (2, D)
    with pytest.raises(quant.QuantizationError, match="quantized already"):
        quant.quantize_params(q, "quant=nf4")
    with pytest.raises(quant.QuantizationError, match="no Dense layer"):
        quant.quantize_params({"ln": {"scale": jnp.ones(3)}}, "quant=nf4")
    with pytest.raises(quant.QuantizationError, match="skip every Dense"):
        quant.quantize_params(params, "quant=nf4(skip=fc*)")
    with pytest.raises(quant.QuantizationError, match="rng"):
        quant.quantize_params(params, "quant=nf4", lora_rank=2)


def test_float_params_under_a_quantizing_policy_are_refused():
    prec = Precision("quant=nf4")
    params = MLP().init(jax.random.key(0), X)
    with pytest.raises(quant.QuantizationError, match="quantize_params"):
        prec.apply(MLP(), params, X)


def test_nnx_setup_replaces_linear_layers():
    prec = Precision("bf16-mixed,quant=nf4(skip=fc2)")
    model = prec.setup(NnxMLP(nnx.Rngs(0)))
    assert isinstance(model.fc1, quant.QuantLinear) and isinstance(model.fc2, nnx.Linear)
    assert model.fc1.weight.get_value().dtype == jnp.uint8
    y = model(X)
    assert y.dtype == jnp.bfloat16 and y.shape == (T, D)
    grads = nnx.grad(lambda m: jnp.sum(m(X).astype(jnp.float32) ** 2))(model)
    state = nnx.state(grads, nnx.Param)
    assert "fc1" in state and "weight" not in state["fc1"]  # the quantized weight is not a Param
    with pytest.raises(quant.QuantizationError, match="quantized already"):
        quant.quantize_module(model, "quant=nf4")


def test_nnx_quant_linear_equals_linen_quant_dense():
    spec = quant.QuantSpec("nf4-dq", compute_dtype="bfloat16")
    kernel = jax.random.normal(jax.random.key(2), (D, H)) * 0.3
    lin = quant.QuantLinear(D, H, spec=spec, kernel=kernel, rngs=nnx.Rngs(0))
    q = quant.quantize_4bit(kernel.T, "nf4", 64, True)
    y_linen = quant.QuantDense(H, mode="nf4-dq", dtype=jnp.bfloat16).apply(
        {"params": {"qweight": q, "bias": jnp.zeros(H)}}, X)
    np.testing.assert_array_equal(np.asarray(lin(X), np.float32), np.asarray(y_linen, np.float32))


def test_dense_general_with_a_flat_output_is_quantized_too():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(H, name="proj")(x)

    prec = Precision("quant=nf4")
    v = prec.init(M(), jax.random.key(0), X)
    assert "qweight" in v["params"]["proj"]
    assert prec.apply(M(), v, X).shape == (T, H)


def test_int8_training_weight_gets_the_straight_through_gradient():
    layer = quant.QuantDense(H, mode="int8-training", dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), X)["params"]
    assert params["kernel"].dtype == jnp.float32 and "qweight" not in params  # trained in the param dtype
    g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X).astype(jnp.float32))))(params)
    # d(sum y)/dW = sum over tokens of x (the quantizer is passed straight through), in W's dtype.
    expected = np.broadcast_to(np.asarray(X.astype(jnp.bfloat16).astype(jnp.float32)).sum(0)[:, None], (D, H))
    np.testing.assert_allclose(np.asarray(g["kernel"], np.float32), expected, rtol=2e-3, atol=2e-3)
