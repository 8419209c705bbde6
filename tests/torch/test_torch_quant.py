"""dualprec_torch.quant: layers per mode, bits against dualprec.ref, forward, training.

Which bitsandbytes 0.50.2 CPU path is exact: bitsandbytes' own Linear4bit equals
dequantize-then-matmul in train mode or with grad enabled (MatMul4Bit: a dequantize and
F.linear; no grad: its gemm_4bit kernel), but only where each row's length is a multiple of
the block size (test_bnb_cpu_rows_not_multiple_of_blocksize_differ), and in eval mode
without grad on an AVX512-BF16 CPU it repacks the weight in place and runs another kernel
whose bf16 results differ (and which asserts on shapes whose out_features is not a multiple
of 32): test_bnb_eval_path_differs_and_is_off_here.  This backend's layers dequantize with
bitsandbytes' exact (flat) path and multiply with F.linear on the CPU: bit for bit
dequantize-then-matmul for every shape, in train and eval mode, with or without grad.  int8: train mode runs dequantize-then-matmul
(exact against the float16 dequantized weight), eval mode LLM.int8 with outlier columns
(within float16 tolerance of dualprec.ref.int8_matmul).
"""

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from dualprec import Policy  # noqa: E402
from dualprec.ref import dequantize_4bit, int8_dequantize_weight, int8_matmul, int8_quantize_weight, quantize_4bit  # noqa: E402
from dualprec_torch import Precision  # noqa: E402
from dualprec_torch.casts import torch_dtype  # noqa: E402
from dualprec_torch.quant import QuantizationError, quantize_module, quantized_layers  # noqa: E402

MODES = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training"]


class Net(nn.Module):
    def __init__(self, d_in=64, hidden=32, out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, out)

    def forward(self, x):
        h = self.norm(F.gelu(self.fc1(x)))
        return self.lm_head(h + F.gelu(self.fc2(h)))


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_makes_the_right_layer(mode):
    model = quantize_module(Net(), mode)
    q = Policy.parse(mode).quantization
    layers = dict(quantized_layers(model))
    assert set(layers) == {"fc1", "fc2", "lm_head"}
    for layer in layers.values():
        if q.is_4bit:
            assert isinstance(layer, bnb.nn.Linear4bit)
            assert layer.weight.quant_type == q.quant_type
            assert layer.weight.compress_statistics == q.double_quant
            assert layer.weight.quant_state.nested == q.double_quant
            assert layer.weight.quant_state.blocksize == 64 == layer.weight.blocksize
            assert layer.weight.dtype == torch.uint8 and layer.quant_storage == torch.uint8
            assert layer.compute_dtype == torch.bfloat16  # the preset's compute dtype
            assert not layer.weight.requires_grad
        else:
            assert isinstance(layer, bnb.nn.Linear8bitLt)
            assert layer.state.threshold == 6.0
            training = mode == "int8-training"
            assert layer.state.has_fp16_weights == training
            assert layer.weight.requires_grad == training
            assert layer.weight.dtype == (torch.float16 if training else torch.int8)
            assert layer.compute_dtype == torch.float16


def test_compute_policy_with_skip_and_overrides():
    model = quantize_module(Net(), "bf16-mixed,quant=nf4-dq(skip=lm_head)")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.fc1.compute_dtype == torch.bfloat16 and model.fc1.weight.quant_state.dtype == torch.float32
    model = quantize_module(Net(), "params=bf16,compute=bf16,quant=fp4(blocksize=128),@fc2=(quant=none)")
    assert type(model.fc2) is nn.Linear
    assert model.fc1.weight.quant_state.blocksize == 128 and model.lm_head.weight.quant_type == "fp4"
    model = quantize_module(Net(), "bf16-true,quant=int8(threshold=4.5)")
    assert model.fc1.state.threshold == 4.5


def test_biases_stay_the_same_parameters():
    net = Net()
    bias = net.fc1.bias
    quantize_module(net, "nf4")
    assert net.fc1.bias is bias


def test_model_without_linear_is_an_error():
    with pytest.raises(QuantizationError, match="has none"):
        quantize_module(nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU()), "nf4")
    # MultiheadAttention's out_proj is an nn.Linear subclass read directly: left alone
    with pytest.raises(QuantizationError, match="out_proj"):
        quantize_module(nn.MultiheadAttention(8, 2), "nf4")


# ----- bits against the reference ---------------------------------------------------------


@pytest.mark.parametrize("mode,blocksize,shape,params", [
    ("nf4", 64, (32, 64), "bfloat16"),
    ("nf4-dq", 128, (24, 128), "float32"),
    ("fp4", 32, (7, 45), "float16"),       # odd element count, partial last block
    ("fp4-dq", 64, (5, 63), "bfloat16"),
])
def test_4bit_codes_and_absmax_equal_reference(mode, blocksize, shape, params):
    net = nn.Sequential(nn.Linear(shape[1], shape[0]))
    w = net[0].weight.detach().clone()
    quantize_module(net, f"params={params},quant={mode}(blocksize={blocksize})")
    layer = net[0]
    packed, st = quantize_4bit(_np(w.to(torch_dtype(params))), mode[:3], blocksize, mode.endswith("-dq"))
    qs = layer.weight.quant_state
    assert np.array_equal(packed, layer.weight.data.numpy())
    assert np.array_equal(np.asarray(st.absmax), qs.absmax.numpy())
    assert qs.dtype == torch_dtype(params) and tuple(qs.shape) == shape
    if st.double_quant:
        assert np.array_equal(_bits(st.nested_absmax), _bits(qs.state2.absmax.numpy()))
        assert _bits(st.offset) == _bits(qs.offset.item())
    deq = _np(layer.dequantize().float())
    ref = dequantize_4bit(packed, st).astype(np.float32)
    # FP4 code 8 is -0.0 in the reference (bitsandbytes' sign-decoding kernels); this layer's
    # dequantize is bitsandbytes', whose AVX512 and odd-length paths read +0.0 from its table.
    assert np.array_equal(_bits(np.where(deq == 0, 0, deq)), _bits(np.where(ref == 0, 0, ref)))


def test_int8_codes_and_scb_equal_reference():
    net = nn.Sequential(nn.Linear(40, 12))
    w = net[0].weight.detach().clone()
    quantize_module(net, "int8")
    codes, scb = int8_quantize_weight(w.numpy())
    assert np.array_equal(codes, net[0].weight.data.numpy())
    assert np.array_equal(_bits(scb), _bits(net[0].weight.SCB.numpy()))


# ----- forward ----------------------------------------------------------------------------


def _reference_4bit(layer, x, compute):
    w = layer.dequantize().to(compute)
    return F.linear(x.to(compute), w, None if layer.bias is None else layer.bias.to(compute))


@pytest.mark.parametrize("mode,compute", [("nf4", "bfloat16"), ("fp4-dq", "float16"), ("nf4-dq", "float32")])
def test_4bit_forward_is_dequantize_then_matmul(mode, compute):
    net = quantize_module(nn.Sequential(nn.Linear(64, 48)), f"params={compute},quant={mode}")
    layer = net[0]
    x = torch.randn(6, 64, dtype=torch_dtype(compute))
    ref = _reference_4bit(layer, x, torch_dtype(compute))
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            assert torch.equal(layer(x), ref)
        xg = x.clone().requires_grad_()
        out = layer(xg)
        assert torch.equal(out, ref)
        out.sum().backward()  # gradients reach the input through the frozen codes
        assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert bytes(layer.weight.data.numpy()) == bytes(layer.weight.data.numpy())


@pytest.mark.parametrize("shape,blocksize", [((3, 48), 32), ((8, 80), 64)])
def test_bnb_cpu_rows_not_multiple_of_blocksize_differ(shape, blocksize):
    lin = nn.Linear(shape[1], shape[0])
    w = lin.weight.detach().numpy().copy()
    plain = bnb.nn.Linear4bit(shape[1], shape[0], quant_type="nf4", compress_statistics=False,
                              compute_dtype=torch.float32)
    plain.weight.blocksize = blocksize
    plain.load_state_dict(lin.state_dict())
    plain = plain.to("cpu")
    ours = quantize_module(nn.Sequential(lin), f"32-true,quant=nf4(blocksize={blocksize})")[0]
    packed, st = quantize_4bit(w, "nf4", blocksize)
    ref_w = torch.from_numpy(dequantize_4bit(packed, st))
    assert torch.equal(ours.dequantize(), ref_w)
    x = torch.randn(2, shape[1], requires_grad=True)
    ref = F.linear(x, ref_w, ours.bias)
    assert torch.equal(ours(x), ref)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not torch.equal(plain(x), ref), "bitsandbytes' fused CPU dequantize fixed? then drop the workaround"


def test_4bit_forward_under_autocast_returns_compute_dtype():
    net = Precision("bf16-mixed,quant=nf4").setup(nn.Sequential(nn.Linear(64, 32)))
    prec = Precision("bf16-mixed,quant=nf4")
    x = torch.randn(3, 64)
    with prec.autocast():
        out = net(x)
    assert out.dtype == torch.bfloat16  # as nn.Linear under autocast
    assert net(x).dtype == torch.float32  # outside: the input's dtype, as bitsandbytes does
    assert torch.equal(out, _reference_4bit(net[0], x, torch.bfloat16))


@pytest.mark.skipif(not bnb.nn.modules.has_avx512bf16(), reason="bitsandbytes' repacked path needs AVX512-BF16")
def test_bnb_eval_path_differs_and_is_off_here():
    lin = nn.Linear(128, 64)
    plain = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=False)
    plain.load_state_dict(lin.state_dict())
    plain = plain.to("cpu").eval()
    ours = quantize_module(nn.Sequential(lin), "nf4")[0].eval()
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    ref = _reference_4bit(ours, x, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), ref)
        theirs = plain(x)
    assert plain.weight.quant_state.packing_format_for_cpu  # it rewrote its weight in place
    assert not torch.equal(theirs, ref), "bitsandbytes' eval path became exact? then update the module doc"


def test_int8_forward_train_mode_exact_eval_mode_llm_int8():
    net = quantize_module(nn.Sequential(nn.Linear(32, 16)), "int8")
    layer = net[0]
    codes, scb = layer.weight.data.numpy().copy(), layer.weight.SCB.numpy().copy()
    x = torch.randn(4, 32, dtype=torch.float16)
    x[0, 3] = 8.0  # an outlier column (|x| >= 6)
    bias16 = layer.bias.detach().half()
    layer.train()
    w16 = torch.from_numpy(int8_dequantize_weight(codes, scb)).half()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, w16, bias16))
    layer.eval()
    with torch.no_grad():
        out = layer(x).float().numpy()
    ref = int8_matmul(x.numpy(), codes, scb, 6.0) + bias16.float().numpy()
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-3)
    assert np.array_equal(layer.weight.data.numpy(), codes)  # the forward left the codes as they were


def test_int8_training_eval_mode_runs_on_cpu():
    net = quantize_module(nn.Sequential(nn.Linear(32, 16)), "int8-training").eval()
    with torch.no_grad():
        out = net(torch.randn(2, 32, dtype=torch.float16))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


# ----- training under Precision -------------------------------------------------------------


def _train(policy, steps=4):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = Precision(policy)
    model, opt = prec.setup(model, opt)
    x, y = torch.randn(16, 64), torch.randint(0, 8, (16,))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with prec.autocast():
            loss = F.cross_entropy(model(prec.convert_input(x)), y)
        prec.backward(loss)
        prec.step(opt)
        losses.append(loss.item())
    return model, opt, losses


def test_nf4_frozen_base_trains_under_precision():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = Precision("bf16-mixed,quant=nf4-dq(skip=lm_head)")
    model, opt = prec.setup(model, opt)
    frozen = model.fc1.weight.data.clone()
    head, bias = model.lm_head.weight.detach().clone(), model.fc1.bias.detach().clone()
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.fc1.weight) not in held and id(model.fc2.weight) not in held  # no full-precision copy kept
    assert id(model.fc1.bias) in held and id(model.lm_head.weight) in held
    x, y = torch.randn(16, 64), torch.randint(0, 8, (16,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with prec.autocast():
            loss = F.cross_entropy(model(x), y)
        prec.backward(loss)
        assert prec.step(opt)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.fc1.weight.data, frozen) and model.fc1.weight.grad is None
    assert not torch.equal(model.lm_head.weight, head) and not torch.equal(model.fc1.bias, bias)


def test_every_optimizer_is_rebound():
    model = Net()
    body = torch.optim.SGD([model.fc1.weight, model.fc1.bias], lr=0.1)
    head = torch.optim.SGD(model.lm_head.parameters(), lr=0.1)
    Precision("int8-training").setup(model, body, head)
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert ids(body.param_groups[0]["params"]) == ids([model.fc1.weight, model.fc1.bias])
    assert ids(head.param_groups[0]["params"]) == ids([model.lm_head.weight, model.lm_head.bias])


def test_int8_training_trains_its_weights():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = Precision("int8-training")
    model, opt = prec.setup(model, opt)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.fc1.weight) in held  # the new trainable weight replaced the original
    before = model.fc1.weight.detach().clone()
    x, y = torch.randn(16, 64, dtype=torch.float16), torch.randint(0, 8, (16,))
    for _ in range(2):
        opt.zero_grad()
        with prec.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        prec.backward(loss)
        prec.step(opt)
    assert model.fc1.weight.dtype == torch.float16 and not torch.equal(model.fc1.weight, before)


@pytest.mark.parametrize("mode,bits", [("nf4", 4.5), ("fp4-dq", 4 + 8 / 64 + 32 / (64 * 256)), ("int8", 8 + 32 / 1024)])
def test_state_dict_bytes_per_weight_match_theory(mode, bits):
    """4-bit: 4 bits + a float32 absmax per 64 values (double quantization: a uint8 code per
    block + a float32 per 256 blocks); int8: 8 bits + a float32 SCB per row."""
    net = quantize_module(nn.Sequential(nn.Linear(1024, 512, bias=False)), mode)
    sd = net.state_dict()
    measured = 8 * sum(v.numel() * v.element_size() for v in sd.values()) / (512 * 1024)
    assert abs(measured - bits) / bits < 0.01, measured


@pytest.mark.parametrize("mode", ["int8", "int8-training"])
def test_int8_layers_take_3d_activations(mode):
    """Transformer activations are [batch, tokens, features]: bitsandbytes' int8 training
    backward fails on them (A.t() of a 3-D tensor); the layer flattens the leading dims."""
    from dualprec_torch import Precision

    torch.manual_seed(0)
    precision = Precision(mode)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = precision.setup(model, optimizer)
    x = torch.randn(2, 4, 32)
    with precision.autocast():
        y3 = model(x)
        y2 = model(x.reshape(8, 32))
    assert y3.shape == (2, 4, 32) and torch.equal(y3.reshape(8, 32), y2)
    precision.backward(y3.float().pow(2).mean())
    assert precision.step(optimizer)


# ----- module-level classes, bitsandbytes' formulas ------------------------------------------


def test_layer_classes_are_importable_module_level_names():
    from dualprec_torch import quant as q
    from dualprec_torch.quant_layers import QuantLinear4bit, QuantLinear8bit

    assert q.QuantLinear4bit is QuantLinear4bit and q.QuantLinear8bit is QuantLinear8bit
    assert QuantLinear4bit.__module__ == QuantLinear8bit.__module__ == "dualprec_torch.quant_layers"
    net = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8))
    quantize_module(net, "32-true,quant=nf4(skip=1)")
    assert type(net[0]) is QuantLinear4bit and type(net[1]) is nn.Linear
    with pytest.raises(AttributeError, match="QuantLinear2bit"):
        q.QuantLinear2bit


def test_int8_dequantize_is_bitsandbytes_matmul_formula():
    """codes * (SCB * (1/127)), as bitsandbytes' int8 matmul dequantizes (division by 127
    rounds differently for some rows)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256))
    quantize_module(net, "int8")
    layer = net[0]
    cb, scb = layer.weight.data, layer.weight.SCB
    theirs = cb.to(torch.float32) * scb.unsqueeze(1).mul(1.0 / 127.0)  # bitsandbytes.autograd._functions
    assert torch.equal(layer.dequantize().view(torch.int32), theirs.view(torch.int32))
    from dualprec_jax import quant as jq

    ours_jax = np.asarray(jq.dequantize_int8({"weight": cb.numpy(), "SCB": scb.numpy()}))
    assert np.array_equal(ours_jax.view(np.uint32), theirs.numpy().view(np.uint32))
    assert not torch.equal(cb.float() * (scb.float()[:, None] / 127.0), theirs)  # the two formulas differ here


@pytest.mark.parametrize("qt,params", [("nf4-dq", "float16"), ("fp4", "bfloat16")])
def test_half_weight_forward_in_float32_equals_plain_bitsandbytes(qt, params):
    """float16/bfloat16 weights computed in float32: dequantized straight to float32, as
    bitsandbytes' Linear4bit forward does (one-hot inputs: one product per output, bit for bit)."""
    torch.manual_seed(0)
    lin = nn.Linear(300, 400, dtype=torch_dtype(params))
    plain = bnb.nn.Linear4bit(300, 400, compute_dtype=None, compress_statistics=qt.endswith("-dq"),
                              quant_type=qt[:3], device="meta")
    plain.weight = bnb.nn.Params4bit(data=lin.weight.detach().clone(), quant_type=qt[:3], requires_grad=False,
                                     compress_statistics=qt.endswith("-dq"))
    plain.bias = nn.Parameter(lin.bias.detach().clone())
    plain = plain.to("cpu").train()
    net = nn.Sequential(lin)
    quantize_module(net, f"params={params},compute=float32,quant={qt}")
    eye = torch.eye(300)[::7] * 1.5
    with torch.no_grad():
        ours, theirs = net(eye), plain(eye)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(net[0].weight.data, plain.weight.data)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
