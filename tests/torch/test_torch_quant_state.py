"""dualprec_torch.quant: state dicts (safetensors, strict), device moves, init_module, bad input."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")

from dualprec import Policy, PolicyError  # noqa: E402
from dualprec_torch import (
    Precision,  # noqa: E402
    quant,  # noqa: E402
)
from dualprec_torch.quant import (  # noqa: E402
    QuantizationError,
    deferred_init,
    load_state_tensors,
    quantize_module,
    state_tensors,
)

MODES = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training"]


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 9, bias=False))  # 288 values: one partial block


def _x(mode):
    return torch.randn(5, 64, dtype=torch.float16 if mode.startswith("int8") else torch.bfloat16)


def _out(model, x):
    model.train()  # the exact CPU path for int8 too (see test_torch_quant)
    with torch.no_grad():
        return model(x)


def _same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", MODES)
def test_full_precision_state_dict_is_quantized_on_load(mode):
    source = _net(1)
    expected = quantize_module(_net(1), mode)
    model = quantize_module(_net(2), mode)
    model.load_state_dict(source.state_dict(), strict=True)
    _same_state(model.state_dict(), expected.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_quantized_state_dict_round_trips_through_safetensors(mode, tmp_path):
    model = quantize_module(_net(1), mode)
    x = _x(mode)
    before = _out(model, x)
    saved = model.state_dict()
    if mode.startswith(("nf4", "fp4")):
        assert f"0.weight.quant_state.bitsandbytes__{mode[:3]}" in saved and "0.weight.absmax" in saved
        assert ("0.weight.nested_absmax" in saved) == mode.endswith("-dq")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(saved, str(path))
    fresh = quantize_module(_net(2), mode)
    result = fresh.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _same_state(fresh.state_dict(), saved)
    assert torch.equal(_out(fresh, x), before)


def test_plain_bitsandbytes_cannot_read_its_own_4bit_state_but_ours_can():
    """The bitsandbytes bug this backend works around: Linear4bit writes the quant-state
    keys and does not read them back."""
    lin = nn.Linear(64, 32)
    plain = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16)
    plain.load_state_dict(lin.state_dict())
    plain = plain.to("cpu")
    sd = plain.state_dict()
    other = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compress_statistics=True).to("cpu")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict(sd, strict=True)
    ours = quantize_module(nn.Sequential(nn.Linear(64, 32)), "bf16-true,quant=nf4-dq")
    ours[0].load_state_dict(sd, strict=True)  # bitsandbytes' own layout, written by bitsandbytes
    assert torch.equal(ours[0].weight.data, plain.weight.data)
    assert torch.equal(ours[0].dequantize(), bnb.functional.dequantize_4bit(plain.weight.data, plain.weight.quant_state))


def test_a_stale_absmax_is_never_kept():
    """Non-strict loading of codes without their quantization state is an error, not garbage."""
    model = quantize_module(_net(1), "nf4")
    sd = {k: v for k, v in quantize_module(_net(2), "nf4").state_dict().items() if ".weight." not in k}
    with pytest.raises(RuntimeError, match=r"0\.weight: a uint8 \(quantized\) weight needs 0\.weight\.quant_state"):
        model.load_state_dict(sd, strict=False)


def test_mismatched_checkpoint_names_the_key_and_both_shapes():
    model = quantize_module(_net(), "nf4")
    wide = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 9, bias=False))
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight: .*shape \(48, 64\).*shape \(32, 64\)"):
        model.load_state_dict(wide.state_dict())
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight: the checkpoint was quantized from shape "
                                           r"\(48, 64\), this model's layer has shape \(32, 64\)"):
        model.load_state_dict(quantize_module(wide, "nf4").state_dict())
    with pytest.raises(RuntimeError, match=r"0\.weight: the checkpoint is fp4-dq with blocksize 64, this layer is "
                                           r"nf4 with blocksize 64"):
        model.load_state_dict(quantize_module(_net(), "fp4-dq").state_dict())
    int8 = quantize_module(_net(), "int8")
    sd = int8.state_dict()
    sd["0.SCB"] = sd["0.SCB"][:7]
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.SCB: the checkpoint has shape \(7,\), this layer has 32 rows"):
        int8.load_state_dict(sd)
    del sd["0.SCB"]
    with pytest.raises(RuntimeError, match=r"0\.weight: a int8 weight needs int8 codes with 0\.SCB"):
        int8.load_state_dict(sd, strict=False)


def test_state_tensors_round_trip_as_numpy():
    model = quantize_module(_net(1), "bf16-mixed,quant=nf4-dq(skip=2)")
    tensors = state_tensors(model)
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    assert "0.weight.quant_state.bitsandbytes__nf4" in tensors and not any(k.startswith("2.") for k in tensors)
    fresh = quantize_module(_net(2), "bf16-mixed,quant=nf4-dq(skip=2)")
    load_state_tensors(fresh, tensors)
    _same_state(fresh[0].state_dict(), model[0].state_dict())
    with pytest.raises(QuantizationError, match="belong to no quantized layer: 9.weight"):
        load_state_tensors(fresh, {**tensors, "9.weight": np.zeros(3, np.float32)})


# ----- device moves -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_moves_and_casts_keep_the_quantized_state(mode, monkeypatch):
    model = quantize_module(_net(1), mode)
    x = _x(mode)
    before, saved = _out(model, x), model.state_dict()
    calls = []
    for name in ("quantize_4bit", "int8_vectorwise_quant"):
        original = getattr(bnb.functional, name)
        monkeypatch.setattr(bnb.functional, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    model.to("cpu")
    model.cpu()
    model.to(torch.float32)
    model.to(torch.bfloat16 if mode == "nf4-dq" else torch.float16)
    model.half()
    model.to(torch.bfloat16 if mode == "nf4-dq" else torch.float16)
    assert not calls, "a move or cast quantized again"
    after = model.state_dict()
    for k in saved:
        if k.endswith("bias"):
            continue  # the bias follows the casts, as any parameter does
        assert torch.equal(after[k], saved[k]), k
    assert torch.equal(_out(model, x), before)


def test_state_dict_loads_with_weights_only_torch_load(tmp_path):
    model = quantize_module(_net(1), "fp4-dq")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = quantize_module(_net(2), "fp4-dq")
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    _same_state(fresh.state_dict(), model.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_cpu_gpu_returns_the_same_bytes(mode):
    model = quantize_module(_net(1), mode, device="cuda")
    assert all(p.device.type == "cuda" for _, layer in quant.quantized_layers(model) for p in layer.parameters())
    x = _x(mode).cuda()
    before, saved = _out(model, x), {k: v.cpu() for k, v in model.state_dict().items()}
    model.cpu()
    _same_state({k: v for k, v in model.state_dict().items()}, saved)
    model.cuda()
    _same_state({k: v.cpu() for k, v in model.state_dict().items()}, saved)
    assert torch.equal(_out(model, x), before)


# ----- init_module --------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.lm_head = nn.Linear(32, 8)


def test_init_module_on_cpu_creates_full_precision_and_setup_quantizes():
    prec = Precision("bf16-true,quant=nf4(skip=lm_head)")
    with prec.init_module():
        model = Tiny()
    assert type(model.body) is nn.Linear and model.body.weight.dtype == torch.bfloat16
    prec.setup(model)
    assert isinstance(model.body, bnb.nn.Linear4bit) and type(model.lm_head) is nn.Linear


def test_deferred_init_never_materialises_full_precision_and_skips_work():
    """What init_module does on a GPU, here on the CPU: Linear weights stay on the meta
    device until setup, which creates and quantizes them one layer at a time."""
    with deferred_init():
        torch.manual_seed(0)
        model = Tiny()
    assert model.body.weight.device.type == "meta" and model.lm_head.weight.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # meta weights hold no memory
        model.body.weight.sum().item()
    Precision("bf16-mixed,quant=nf4-dq(skip=lm_head)").setup(model)
    assert isinstance(model.body, bnb.nn.Linear4bit) and model.body.weight.device.type == "cpu"
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.device.type == "cpu"
    bound = 1 / 32 ** 0.5  # nn.Linear's initialisation happened
    assert 0 < model.lm_head.weight.abs().max() <= bound and model.lm_head.bias.abs().max() <= bound
    assert model.body.dequantize().abs().max() > 0
    out = model.lm_head(model.body(torch.randn(2, 64)).float())
    assert torch.isfinite(out).all()


def test_deferred_empty_init_is_filled_by_the_checkpoint():
    source = Tiny()
    with deferred_init(empty_init=True):
        model = Tiny()
    quantize_module(model, "nf4")
    with pytest.raises(QuantizationError, match="no quantized weight yet"):
        model.body(torch.randn(1, 64, dtype=torch.bfloat16))
    model.to("cpu").to(torch.bfloat16)  # an empty layer moves: the weight to come lands there
    model.load_state_dict(source.state_dict(), strict=True)
    expected = quantize_module(source, "nf4").to(torch.bfloat16)
    _same_state(model.state_dict(), expected.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_init_module_quantizes_layer_by_layer():
    prec = Precision("bf16-true,quant=nf4-dq(skip=lm_head)", device="cuda")
    with prec.init_module():
        model = Tiny()
    assert model.body.weight.device.type == "meta"
    prec.setup(model)
    assert isinstance(model.body, bnb.nn.Linear4bit) and model.body.weight.device.type == "cuda"
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.device.type == "cuda"
    assert torch.isfinite(model.lm_head(model.body(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)))).all()


# ----- bad input ----------------------------------------------------------------------------


def test_bad_input_errors_name_the_fix(monkeypatch):
    with pytest.raises(PolicyError, match="blocksize 100 is not supported by bitsandbytes; use one of 32, 64"):
        Policy.parse("quant=nf4(blocksize=100)")
    with pytest.raises(PolicyError, match="float64"):
        Policy.parse("64-true,quant=nf4")
    model = quantize_module(_net(), "nf4")
    with pytest.raises(QuantizationError, match="already quantized .*quantize a model once"):
        quantize_module(model, "nf4")
    prec = Precision("nf4")
    with pytest.raises(QuantizationError, match="already quantized"):
        prec.setup(model)
    broken = _net()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize_module(broken, "nf4")
    with pytest.raises(QuantizationError, match="itself is an nn.Linear"):
        quantize_module(nn.Linear(4, 4), "nf4")


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    quant._bnb.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install "dualprec\[bnb\]"'):
            quantize_module(_net(), "nf4")
        try:
            prec = Precision("nf4")  # the capability check may refuse it up front ...
        except PolicyError as e:
            assert "dualprec[bnb]" in str(e)
        else:
            with pytest.raises(ImportError, match=r'pip install "dualprec\[bnb\]"'):  # ... or setup does
                prec.setup(_net())
    finally:
        quant._bnb.cache_clear()


def test_optimizer_that_stepped_before_setup_is_refused():
    model = _net()
    opt = torch.optim.Adam(model.parameters())
    F.mse_loss(model(torch.randn(2, 64)), torch.zeros(2, 9)).backward()
    opt.step()
    with pytest.raises(QuantizationError, match="before the first optimizer step"):
        Precision("nf4").setup(model, opt)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_precision_checkpoint_carries_the_quantized_weights(mode, tmp_path):
    from dualprec import checkpoint

    prec = Precision(f"bf16-mixed,quant={mode}" if mode != "int8" else "int8")
    model = prec.setup(_net(1))
    path = tmp_path / "precision.safetensors"
    checkpoint.save_state(path, prec.state_dict())
    state = checkpoint.load_state(path)
    assert "0.weight.absmax" in state["extensions"]["quant"] or "0.SCB" in state["extensions"]["quant"]
    fresh_prec = Precision(prec.policy)
    fresh = fresh_prec.setup(_net(2))
    fresh_prec.load_state_dict(state)
    _same_state(fresh.state_dict(), model.state_dict())
