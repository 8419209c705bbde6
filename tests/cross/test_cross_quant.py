"""Quantized checkpoints that cross: a torch bitsandbytes model's state dict (safetensors)
loads into the JAX params, and JAX-quantized params save to a file a bitsandbytes torch model
loads with ``load_state_dict(strict=True)``; dequantized weights bit-identical both ways,
forwards within the compute dtype's tolerance.  NF4/FP4 (plain and double-quantized) and int8.

bitsandbytes 0.50.2's ``Linear4bit`` writes ``weight.absmax`` ... ``weight.quant_state.*``
but does not read them back (strict=True fails on them as unexpected keys, and strict=False
keeps the old quant state: silent garbage); ``_read_quant_state`` below loads them through
bitsandbytes' documented ``Params4bit.from_prequantized``.  bitsandbytes' CPU forward is
compared in train mode: its eval-mode path repacks the weight for an AVX512-BF16 kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")
import bitsandbytes.functional as bnbF  # noqa: E402
import flax.linen as nn  # noqa: E402

from dualprec import Policy  # noqa: E402
from dualprec_jax import Precision, quant  # noqa: E402

# Row lengths multiples of the block size: bitsandbytes' fused CPU dequantize (its forward) is
# wrong for rows that are a multiple of 16 but not of the block size on AVX512 machines.
D_IN, D_HID, D_OUT, TOKENS = 64, 128, 16, 5


class JaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT, name="fc2")(nn.relu(nn.Dense(D_HID, name="fc1")(x)))


class TorchMLP(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.fc1, self.fc2 = make(D_IN, D_HID), make(D_HID, D_OUT)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _linear4bit(mode, compute=torch.float32):
    def make(i, o):
        layer = bnb.nn.Linear4bit(i, o, compute_dtype=compute, compress_statistics=mode.endswith("-dq"),
                                  quant_type=mode[:3])
        layer.register_load_state_dict_pre_hook(_read_quant_state)
        return layer
    return make


def _linear8bit(i, o):
    return bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False, threshold=6.0)


def _read_quant_state(module, state_dict, prefix, *args):
    """Give a Linear4bit the quant state of the checkpoint (bitsandbytes ignores it)."""
    keys = [k for k in state_dict if k.startswith(prefix + "weight.")]
    if keys:
        stats = {k[len(prefix + "weight."):]: state_dict.pop(k) for k in keys}
        module.weight = bnb.nn.Params4bit.from_prequantized(state_dict[prefix + "weight"], stats, device="cpu",
                                                            module=module)


def _float_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((o, i)).astype(np.float32) / np.sqrt(i), rng.standard_normal(o).astype(np.float32))
            for name, (i, o) in {"fc1": (D_IN, D_HID), "fc2": (D_HID, D_OUT)}.items()}


def _torch_model(make, weights):
    model = TorchMLP(make)
    for name, (w, b) in weights.items():
        layer = getattr(model, name)
        layer.weight.data.copy_(torch.from_numpy(w).to(layer.weight.dtype))
        layer.bias.data.copy_(torch.from_numpy(b))
    return model.to("cpu")  # bitsandbytes quantizes on the move to the device


def _jax_float_params(weights):
    return {name: {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)} for name, (w, b) in weights.items()}


def _x(seed=1):
    return np.random.default_rng(seed).standard_normal((TOKENS, D_IN)).astype(np.float32)


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _bnb_dequantized(layer):
    """bitsandbytes' generic dequantize of a Linear4bit (a 1-D shape avoids the fused AVX512
    path, wrong for some row lengths: see tests/ref/test_ref_fourbit_bnb.py)."""
    qs = layer.weight.quant_state
    flat = bnbF.QuantState(qs.absmax, torch.Size([qs.shape.numel()]), qs.code, qs.blocksize, qs.quant_type,
                           qs.dtype, qs.offset, qs.state2)
    return bnbF.dequantize_4bit(layer.weight.data, flat).numpy().reshape(tuple(qs.shape))


MODES_4BIT = ["nf4", "nf4-dq", "fp4", "fp4-dq"]


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4"])  # all four: the JAX -> torch test below
def test_torch_bnb_checkpoint_loads_into_jax(mode, tmp_path):
    weights = _float_weights()
    model = _torch_model(_linear4bit(mode), weights)
    path = tmp_path / "bnb.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    policy = Policy.parse(f"quant={mode}")
    params = quant.load_bnb(path, _jax_float_params(weights), policy)
    for name in ("fc1", "fc2"):
        ours = quant.dequantize_4bit(params[name]["qweight"], mode[:3], 64, weights[name][0].shape)
        theirs = _bnb_dequantized(getattr(model, name))
        nonzero = np.asarray(ours) != 0  # bnb's CPU kernel gives FP4's "-0" code as -0.0
        assert np.array_equal(_bits(ours)[nonzero], _bits(theirs)[nonzero]) and not theirs[~nonzero].any()
    model.train()
    with torch.no_grad():
        y_torch = model(torch.from_numpy(_x())).numpy()
    y_jax = Precision(policy).apply(JaxMLP(), {"params": params}, jnp.asarray(_x()))
    np.testing.assert_allclose(np.asarray(y_jax), y_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES_4BIT)
def test_jax_quantized_params_load_into_bnb_strictly(mode, tmp_path):
    weights = _float_weights(seed=2)
    policy = Policy.parse(f"quant={mode}")
    params = quant.quantize_params(_jax_float_params(weights), policy)
    path = tmp_path / "jax.safetensors"
    quant.save_bnb(path, params, policy)
    saved = safetensors_torch.load_file(str(path))
    # Every tensor, the packed quant_state JSON included, is what bitsandbytes itself writes.
    own = _torch_model(_linear4bit(mode), weights).state_dict()
    assert set(saved) == set(own)
    for key, value in own.items():
        assert saved[key].dtype == value.dtype and saved[key].shape == value.shape, key
        assert torch.equal(saved[key].view(-1).view(torch.uint8), value.contiguous().view(-1).view(torch.uint8)), key
    # A fresh bitsandbytes model (quantized from other weights) loads it strictly.
    model = _torch_model(_linear4bit(mode), _float_weights(seed=9))
    model.load_state_dict(saved, strict=True)
    for name in ("fc1", "fc2"):
        ours = quant.dequantize_4bit(params[name]["qweight"], mode[:3], 64, weights[name][0].shape)
        theirs = _bnb_dequantized(getattr(model, name))
        nonzero = np.asarray(ours) != 0
        assert np.array_equal(_bits(ours)[nonzero], _bits(theirs)[nonzero]) and not theirs[~nonzero].any()
    model.train()
    with torch.no_grad():
        y_torch = model(torch.from_numpy(_x())).numpy()
    y_jax = Precision(policy).apply(JaxMLP(), {"params": params}, jnp.asarray(_x()))
    np.testing.assert_allclose(np.asarray(y_jax), y_torch, rtol=1e-5, atol=1e-5)


def test_bnb_linear4bit_does_not_read_its_own_quant_state():
    """The bitsandbytes bug the hook above works around: if it is fixed, drop the hook."""
    weights = _float_weights()
    saved = _torch_model(_linear4bit("nf4-dq"), weights).state_dict()
    plain = TorchMLP(lambda i, o: bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4")).to("cpu")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(saved, strict=True)


def test_int8_crosses_both_ways(tmp_path):
    weights = _float_weights(seed=4)
    policy = Policy.parse("16-mixed,quant=int8")
    model = _torch_model(_linear8bit, weights)
    path = tmp_path / "bnb8.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    params = quant.load_bnb(path, _jax_float_params(weights), policy)
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        np.testing.assert_array_equal(np.asarray(params[name]["qweight"]["weight"]), layer.weight.data.numpy())
        assert np.array_equal(_bits(params[name]["qweight"]["SCB"]), _bits(layer.weight.SCB.numpy()))
    # JAX -> torch: JAX's own quantization, the same bytes as bitsandbytes', loaded strictly.
    ours = quant.quantize_params(_jax_float_params(weights), policy)
    path2 = tmp_path / "jax8.safetensors"
    quant.save_bnb(path2, ours, policy)
    saved = safetensors_torch.load_file(str(path2))
    own = model.state_dict()
    assert set(saved) == set(own)
    for key, value in own.items():
        assert torch.equal(saved[key], value), key
    fresh = _torch_model(_linear8bit, _float_weights(seed=8))
    fresh.load_state_dict(saved, strict=True)
    x = _x() * 0.5
    with torch.no_grad():
        y_torch = fresh(torch.from_numpy(x).half()).float().numpy()
    y_jax = np.asarray(Precision(policy).apply(JaxMLP(), {"params": ours}, jnp.asarray(x)))
    # bitsandbytes computes in float16 (and scales by a slightly-off 1/127**2): float16 tolerance.
    np.testing.assert_allclose(y_jax, y_torch, rtol=2e-2, atol=2e-2 * np.abs(y_torch).max())


def test_checkpoint_errors_name_the_key_and_both_shapes(tmp_path):
    weights = _float_weights()
    model = _torch_model(_linear4bit("nf4"), weights)
    path = tmp_path / "bnb.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    wrong = _jax_float_params(weights)
    wrong["fc1"] = {"kernel": jnp.zeros((D_IN, D_HID + 1)), "bias": jnp.zeros(D_HID + 1)}
    with pytest.raises(quant.QuantizationError, match=r"fc1\.weight\.quant_state.*\[128, 64\].*\[129, 64\]"):
        quant.load_bnb(path, wrong, "quant=nf4")
    with pytest.raises(quant.QuantizationError, match="nf4 blocksize 64, the policy fp4"):
        quant.load_bnb(path, _jax_float_params(weights), "quant=fp4")
    with pytest.raises(quant.QuantizationError, match="not double-quantized"):
        quant.load_bnb(path, _jax_float_params(weights), "quant=nf4-dq")
    q = quant.quantize_params(_jax_float_params(weights), "quant=nf4")
    with pytest.raises(quant.QuantizationError, match="already-quantized"):
        quant.load_bnb(path, q, "quant=nf4")
    extra = {**safetensors_torch.load_file(str(path)), "head.weight": torch.zeros(2, 2)}
    with pytest.raises(quant.QuantizationError, match="head.weight"):
        quant.from_bnb_state_dict({k: v.numpy() for k, v in extra.items()}, _jax_float_params(weights), "quant=nf4")


def test_state_tensors_round_trip():
    weights = _float_weights()
    policy = "bf16-mixed,quant=nf4-dq(skip=fc2)"
    q = quant.quantize_params(_jax_float_params(weights), policy)
    tensors = quant.state_tensors(q, policy)
    assert sorted(tensors) == sorted(f"fc1.{k}" for k in ("weight", "weight.absmax", "weight.quant_map",
                                                         "weight.nested_absmax", "weight.nested_quant_map",
                                                         "weight.quant_state.bitsandbytes__nf4"))
    back = quant.load_state_tensors(q, policy, tensors)
    jax.tree.map(np.testing.assert_array_equal, back, q)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_dualprec_torch_layers_read_and_write_the_same_checkpoints(mode, tmp_path):
    """dualprec_torch.quant's layers load the JAX file strictly (no hook needed), and their
    state dict loads back into the same JAX params, byte for byte."""
    from dualprec_torch import quant as tq
    policy = "quant=nf4-dq" if mode == "nf4-dq" else "16-mixed,quant=int8"
    weights = _float_weights(seed=3)
    params = quant.quantize_params(_jax_float_params(weights), policy)
    path = tmp_path / "jax.safetensors"
    quant.save_bnb(path, params, policy)
    model = tq.quantize_module(TorchMLP(torch.nn.Linear), policy, device="cpu")
    model.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    x = _x()
    with torch.no_grad():
        y_torch = model(torch.from_numpy(x).to(torch.float16 if mode == "int8" else torch.float32)).float().numpy()
    y_jax = np.asarray(Precision(policy).apply(JaxMLP(), {"params": params}, jnp.asarray(x)))
    tol = 2e-2 if mode == "int8" else 1e-5  # int8: bitsandbytes' float16 product
    np.testing.assert_allclose(y_jax, y_torch, rtol=tol, atol=tol * np.abs(y_torch).max())
    back = quant.from_bnb_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                     _jax_float_params(weights), policy)
    jax.tree.map(np.testing.assert_array_equal, back, params)
