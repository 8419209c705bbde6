"""Lightning Fabric's precision-plugin tests that need Transformer Engine or a GPU
(tests_fabric/plugins/precision: test_transformer_engine.py, and test_bitsandbytes.py's
test_bitsandbytes_plugin, test_bitsandbytes_layers, test_bitsandbytes_layers_meta_device),
rewritten for DualprecPrecision on a CPU.

Transformer Engine: Fabric's test drives its plugin through a mocked ``transformer_engine``;
this one uses the stand-in package of tests/torch/te_stand_in.py (real torch layers that
record their arguments) and a CUDA `DeviceCaps` with TE, so the mapping (policy -> weights
dtype, recipe, which layers become TE layers) is checked and no FP8 GEMM runs.
bitsandbytes: the same steps on the CPU, with the real bitsandbytes (its CPU kernels), where
Fabric's run on "cuda".  Differences from Fabric's plugins, kept on purpose and asserted
here, are listed in docs/fabric.md ("Lightning's tests")."""

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")
from lightning.fabric import Fabric  # noqa: E402
from te_stand_in import stand_in  # noqa: E402

from dualprec import DeviceCaps, PolicyError  # noqa: E402
from dualprec_torch import te  # noqa: E402
from dualprec_torch.fabric import DualprecPrecision  # noqa: E402

H100_TE = DeviceCaps("cuda", name="NVIDIA H100", compute_capability=(9, 0), backend="torch",
                     transformer_engine=True, bitsandbytes=True)


# ----- test_transformer_engine.py -------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["te2", "te1"])
def te_modules(request, monkeypatch):
    modules, calls = stand_in(new_api=request.param)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["transformer_engine.pytorch"], modules["transformer_engine.common.recipe"], calls


class _SubModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(1, 3)


class _MyModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 48)
        self.l2 = nn.LayerNorm(1)
        self.l3 = _SubModule()


@pytest.mark.parametrize("policy, weights", [("transformer-engine", torch.bfloat16),
                                             ("transformer-engine-float16", torch.float16)])
def test_transformer_engine_weights_dtype(policy, weights, te_modules):
    plugin = DualprecPrecision(policy, device=H100_TE)
    assert plugin.precision == policy
    assert plugin.policy.param_dtype == str(weights).removeprefix("torch.")
    with plugin.module_init_context():  # Fabric: the weights dtype as default dtype while building
        assert torch.get_default_dtype() == weights
        model = nn.Linear(16, 16)
    assert model.weight.dtype == weights
    assert torch.get_default_dtype() == torch.float32


def test_transformer_engine_recipe(te_modules):
    _, recipes, _ = te_modules
    # Fabric builds DelayedScaling() with TE's defaults; the preset spells them out
    recipe = te.te_recipe(DualprecPrecision("transformer-engine", device=H100_TE).policy.fp8)
    assert type(recipe) is recipes.DelayedScaling
    assert recipe.kwargs == dict(fp8_format=recipes.Format.HYBRID, margin=0, amax_history_len=1024,
                                 amax_compute_algo="max")
    # Fabric's recipe={"fp8_format": "HYBRID", ...}: in a policy string, fp8=delayed(format=...)
    custom = DualprecPrecision("transformer-engine-float16,fp8=delayed(format=e4m3,history=16,engine=te)",
                               device=H100_TE)
    assert custom.policy.param_dtype == "float16"
    assert te.te_recipe(custom.policy.fp8).kwargs == dict(fp8_format=recipes.Format.E4M3, margin=0,
                                                           amax_history_len=16, amax_compute_algo="max")


@pytest.mark.parametrize("context", ["module_init_context", "tensor_init_context"])
def test_transformer_engine_default_dtype_is_restored(context, te_modules):
    plugin = DualprecPrecision("transformer-engine", device=H100_TE)
    with pytest.raises(RuntimeError, match="foo"), getattr(plugin, context)():
        assert torch.get_default_dtype() is not torch.float32
        raise RuntimeError("foo")
    assert torch.get_default_dtype() is torch.float32


def test_transformer_engine_convert_module(te_modules):
    module, _, calls = te_modules
    plugin = DualprecPrecision("transformer-engine-float16", device=H100_TE)
    model = _MyModule()
    # Fabric's replace_layers=True: Linear and LayerNorm become TE layers; a Linear TE cannot
    # run in FP8 (Linear(1, 3)) stays a torch layer, with a warning naming it
    with pytest.warns(UserWarning, match=r"cannot run l3\.l in FP8: .*out_features % 8 == 0 and in_features % 16"):
        model = plugin.convert_module(model)
    assert type(model.l1) is module.Linear and type(model.l2) is module.LayerNorm
    assert type(model.l3.l) is nn.Linear and model.l3.l.weight.dtype == torch.float16
    assert model.l1.args == (16, 48) and model.l1.kwargs["params_dtype"] == torch.float16
    assert model.l1.weight.dtype == model.l2.weight.dtype == torch.float16
    calls.clear()
    with plugin.forward_context():
        assert model.l1(torch.ones(8, 16, dtype=torch.float16)).dtype == torch.float16
    assert calls == [("forward", "Linear")]


def test_transformer_engine_module_init_context_builds_torch_layers(te_modules):
    """Fabric (replace_layers=True) swaps nn.Linear for te.Linear inside init_module; the plugin
    enters TE's quantized_model_init there and swaps the layers at setup (convert_module)."""
    module, _, calls = te_modules
    plugin = DualprecPrecision("transformer-engine-float16", device=H100_TE)
    with plugin.module_init_context():
        assert torch.get_default_dtype() == torch.float16
        model = _MyModule()
    assert any(c[0] in ("quantized_model_init", "fp8_model_init") for c in calls)
    assert type(model.l1) is nn.Linear and model.l1.weight.dtype == torch.float16
    with pytest.warns(UserWarning, match="cannot run l3.l"):
        model = plugin.convert_module(model)
    assert type(model.l1) is module.Linear and type(model.l2) is module.LayerNorm


def test_transformer_engine_without_te_names_the_install(monkeypatch):
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
                 "transformer_engine.common.recipe"):
        monkeypatch.setitem(sys.modules, name, None)
    from dualprec import UnsupportedPolicyError

    with pytest.raises(UnsupportedPolicyError, match=r"Transformer Engine is not installed.*engine=native"):
        DualprecPrecision("transformer-engine", device=H100_TE).convert_module(nn.Linear(16, 16))


# ----- test_bitsandbytes.py -----------------------------------------------------------------------
class _BnbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(2, 2)
        self.ln = nn.LayerNorm(2, bias=False)


def _bnb_fabric(policy):
    pytest.importorskip("bitsandbytes")
    return Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision(policy)])


QUANT = [("16-true,quant=int8", torch.int8, torch.float16), ("bf16-true,quant=nf4", torch.uint8, torch.bfloat16)]


def test_bitsandbytes_plugin_dtype_and_ignored_modules():
    """test_bitsandbytes_plugin: BitsandbytesPrecision("nf4", dtype=float16), ignore_modules."""
    from dualprec.errors import QuantizationError

    fabric = _bnb_fabric("16-true,quant=nf4")
    plugin = fabric.strategy.precision
    with pytest.raises(RuntimeError, match="foo"), plugin.module_init_context():
        assert torch.get_default_dtype() is torch.float16
        raise RuntimeError("foo")
    assert torch.get_default_dtype() is torch.float32
    with plugin.module_init_context():
        model = _MyModule()
    model = plugin.convert_module(model)
    assert model.l1.compute_dtype is model.l3.l.compute_dtype is torch.float16  # the dtype is the compute dtype
    assert model.l1.weight.dtype == torch.uint8
    skipping = DualprecPrecision("16-true,quant=nf4(skip=l3.*)").convert_module(_MyModule())  # ignore_modules
    assert skipping.l1.weight.dtype == torch.uint8 and type(skipping.l3.l) is nn.Linear
    assert skipping.l3.l.weight.dtype == torch.float16
    with pytest.raises(QuantizationError, match="has none"):  # Fabric: TypeError "your model has no Linear"
        plugin.convert_module(nn.Conv1d(1, 1, 1))


@pytest.mark.parametrize("policy, expected, half", QUANT)
def test_bitsandbytes_layers(policy, expected, half):
    """test_bitsandbytes_layers (Fabric: on "cuda", torch <= 2.4)."""
    state_dict = _BnbModel().state_dict()
    fabric = _bnb_fabric(policy)
    with fabric.init_module():
        model = _BnbModel()
    # Fabric quantizes on the GPU as the layer is built; the plugin on the CPU at setup
    assert type(model.l) is nn.Linear and model.l.weight.dtype == half
    model = fabric.setup(model)
    assert model.l.weight.dtype == expected and model.ln.weight.dtype == half
    # an unquantized state dict still loads, re-quantized
    before = model.l.weight.detach().clone()
    keys = model.load_state_dict(state_dict, strict=True)
    assert not keys.missing_keys and not torch.equal(before, model.l.weight)
    assert model.l.weight.dtype == expected
    # and a quantized state dict loads into a quantized model, unchanged
    quantized = {k: v.clone() for k, v in model.state_dict().items()}
    keys = model.load_state_dict(quantized, strict=True)
    assert not keys.missing_keys and torch.equal(model.l.weight, quantized["l.weight"])
    # ignored modules (skip=): Fabric refuses them inside init_module; here they stay full
    # precision and the others quantize at setup
    fabric = _bnb_fabric(policy.replace("quant=int8", "quant=int8(skip=foo)").replace("quant=nf4", "quant=nf4(skip=foo)"))
    with fabric.init_module():
        model = _BnbModel()
    with pytest.raises(PolicyError, match='skip pattern "foo".* matches no module'):  # an error here
        fabric.setup(model)
    fabric = _bnb_fabric(policy.replace("quant=int8", "quant=int8(skip=ln)").replace("quant=nf4", "quant=nf4(skip=ln)"))
    model = _BnbModel()
    assert model.l.weight.dtype == torch.float32  # without init_module: quantized at setup
    model = fabric.setup(model)
    assert model.l.weight.dtype == expected


@pytest.mark.filterwarnings("ignore:for ln.weight. copying from a non-meta parameter:UserWarning")
@pytest.mark.parametrize("policy, expected, half", QUANT)
def test_bitsandbytes_layers_meta_device(policy, expected, half, tmp_path):
    """test_bitsandbytes_layers_meta_device (Fabric: on "cuda"; its int8 case is an xfail,
    NotImplementedError, which here runs)."""
    from lightning.fabric.utilities.init import _materialize_meta_tensors

    state_dict = _BnbModel().state_dict()
    fabric = _bnb_fabric(policy)

    # case 1: built on meta, materialised; Fabric quantizes as it materialises, the plugin at setup
    with fabric.init_module(empty_init=False), torch.device("meta"):
        model = _BnbModel()
    assert model.l.weight.device.type == "meta" and model.l.weight.dtype == half
    _materialize_meta_tensors(model, "cpu")
    assert model.l.weight.device.type == "cpu" and model.l.weight.dtype == half
    model = fabric.setup(model)
    assert model.l.weight.dtype == expected
    before = model.l.weight.detach().clone()
    keys = model.load_state_dict(state_dict, strict=True)
    assert not keys.missing_keys and not torch.equal(before, model.l.weight) and model.l.weight.dtype == expected

    # case 2: set up while on meta (move_to_device=False): the Linear layers are created and
    # quantized there, the state dict then fills them
    with fabric.init_module(empty_init=False), torch.device("meta"):
        model = _BnbModel()
    model = fabric.setup(model, move_to_device=False)
    assert model.l.weight.device.type == "cpu" and model.l.weight.dtype == expected
    keys = model.load_state_dict(state_dict, strict=True)  # torch warns: ln on meta takes nothing
    assert not keys.missing_keys and model.l.weight.dtype == expected and model.ln.weight.device.type == "meta"
    reference = _bnb_fabric(policy).setup(_BnbModel())
    reference.load_state_dict(state_dict)
    assert torch.equal(model.l.weight, reference.l.weight)  # quantized from the loaded weight

    # case 2 with an incomplete state dict: the LayerNorm stays on meta until materialised
    with fabric.init_module(empty_init=False), torch.device("meta"):
        model = _BnbModel()
    model = fabric.setup(model, move_to_device=False)
    keys = model.load_state_dict({k: v for k, v in state_dict.items() if "ln" not in k}, strict=False)
    assert keys.missing_keys == ["ln.weight"]
    assert model.l.weight.dtype == expected and model.ln.weight.device.type == "meta"
    _materialize_meta_tensors(model, fabric.device)
    assert model.ln.weight.device.type == "cpu" and model.ln.weight.dtype == half
    assert torch.equal(model.l.weight, reference.l.weight)

    # mmap and assign on a meta model: quantized at setup from the assigned weights
    with fabric.init_module(empty_init=False), torch.device("meta"):
        model = _BnbModel()
    torch.save(state_dict, tmp_path / "foo.ckpt")
    loaded = torch.load(tmp_path / "foo.ckpt", mmap=True, weights_only=True)
    keys = model.load_state_dict(loaded, strict=True, assign=True)
    assert not keys.missing_keys
    model = fabric.setup(model)
    assert model.l.weight.dtype == expected and torch.equal(model.l.weight, reference.l.weight)


# ----- on a GPU (the device script; skipped without CUDA) --------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy, expected, half", QUANT)
def test_bitsandbytes_layers_on_cuda(policy, expected, half):
    """test_bitsandbytes_layers as Fabric runs it, on "cuda": init_module keeps the Linear
    weights on meta (no full-precision copy), setup creates and quantizes them on the GPU."""
    pytest.importorskip("bitsandbytes")
    state_dict = _BnbModel().state_dict()
    fabric = Fabric(accelerator="cuda", devices=1, plugins=[DualprecPrecision(policy, device="cuda")])
    with fabric.init_module():
        model = _BnbModel()
    assert model.l.weight.device.type == "meta"
    model = fabric.setup(model)
    assert model.l.weight.device.type == "cuda" and model.l.weight.dtype == expected
    assert model.ln.weight.device.type == "cuda" and model.ln.weight.dtype == half
    before = model.l.weight.detach().clone()
    keys = model.load_state_dict(state_dict, strict=True)
    assert not keys.missing_keys and not torch.equal(before, model.l.weight)
    assert model.l.weight.device.type == "cuda" and model.l.weight.dtype == expected
    assert torch.isfinite(model.l(torch.ones(2, 2, device="cuda", dtype=half))).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed"])
def test_mixed_training_on_cuda_matches_fabrics_plugin(policy):
    """The plugin and Fabric's MixedPrecision train the same weights, bit for bit, on CUDA."""
    from lightning.fabric.plugins.precision import MixedPrecision

    weights = []
    for plugin in (DualprecPrecision(policy, device="cuda"), MixedPrecision(policy, device="cuda")):
        torch.manual_seed(0)
        fabric = Fabric(accelerator="cuda", devices=1, plugins=[plugin])
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
        model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 32, device="cuda", generator=g)
            optimizer.zero_grad()
            fabric.backward(nn.functional.mse_loss(model(x), torch.zeros(16, 8, device="cuda")))
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
