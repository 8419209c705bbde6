"""Lightning Fabric's own precision-plugin tests (tests_fabric/plugins/precision: test_amp,
test_half, test_double, test_all, test_amp_integration), rewritten for DualprecPrecision where
their semantics apply: the plugin must behave as Fabric's MixedPrecision, HalfPrecision,
DoublePrecision and 32-true Precision do.  Where Fabric mocks the scaler, these use a real
optimizer and the real loss scale.  Differences kept on purpose: "16-mixed" on CPU runs
float16 (Fabric substitutes bfloat16 with a warning)."""

from unittest import mock

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")
from lightning.fabric import Fabric  # noqa: E402

from dualprec_torch.fabric import DualprecPrecision  # noqa: E402

HALF = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


# ----- test_amp.py --------------------------------------------------------------------------
def test_amp_bf16_has_no_loss_scale():
    plugin = DualprecPrecision("bf16-mixed", device="cpu")
    assert not plugin.policy.loss_scale.enabled and plugin.scale == 1.0
    assert DualprecPrecision("16-mixed", device="cpu").scale == 2.0**16


@pytest.mark.parametrize("policy, dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
def test_amp_precision_forward_context(policy, dtype):
    plugin = DualprecPrecision(policy, device="cpu")
    assert torch.get_default_dtype() == torch.float32
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == dtype
    assert not torch.is_autocast_enabled("cpu")


def _set_up(plugin, model=None):
    model = plugin.convert_module(model or nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plugin._adopted(optimizer)
    return model, optimizer


def test_amp_precision_backward_scales_the_loss():
    plugin = DualprecPrecision("16-mixed", device="cpu")
    model, _ = _set_up(plugin)
    x = torch.ones(1, 3)
    with plugin.forward_context():
        loss = model(x).float().sum() / 4  # a float16 gradient of 2**16 would overflow
    plugin.backward(loss, model)
    assert torch.equal(model.bias.grad, torch.full((2,), 2.0**14))  # d(scale * sum / 4)/d bias


@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed"])
def test_amp_precision_optimizer_step_steps_once(policy):
    plugin = DualprecPrecision(policy, device="cpu")
    model, optimizer = _set_up(plugin)
    with plugin.forward_context():
        loss = model(torch.ones(1, 3)).float().sum() / 4
    plugin.backward(loss, model)
    with mock.patch.object(optimizer, "step", wraps=optimizer.step) as step:
        plugin.optimizer_step(optimizer)
    step.assert_called_once_with()


def test_optimizer_step_without_gradients_steps_nothing():
    plugin = DualprecPrecision("bf16-mixed", device="cpu")
    model, optimizer = _set_up(plugin)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="no parameter of this optimizer has a gradient"):
        plugin.optimizer_step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----- test_half.py ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(HALF))
def test_half_selected_dtype(policy):
    plugin = DualprecPrecision(policy)
    assert plugin.precision == policy
    assert plugin.convert_input(torch.ones(1)).dtype == HALF[policy]
    assert plugin.convert_output(torch.ones(1, dtype=HALF[policy])).dtype == torch.float32


@pytest.mark.parametrize("policy", list(HALF))
def test_half_module_init_context(policy):
    plugin = DualprecPrecision(policy)
    with plugin.module_init_context():
        model = nn.Linear(2, 2)
        assert torch.get_default_dtype() == HALF[policy]
    assert model.weight.dtype == HALF[policy]
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("policy", list(HALF))
def test_half_forward_context(policy):
    plugin = DualprecPrecision(policy)
    assert torch.get_default_dtype() == torch.float32
    with plugin.forward_context():
        assert torch.get_default_dtype() == HALF[policy]
    assert torch.get_default_dtype() == torch.float32


# ----- test_double.py -------------------------------------------------------------------------
def test_double_precision_forward_context():
    plugin = DualprecPrecision("64-true")
    with plugin.forward_context():
        assert torch.get_default_dtype() == torch.float64
    assert torch.get_default_dtype() == torch.float32


def test_double_convert_module():
    module = DualprecPrecision("64-true").convert_module(nn.Linear(2, 2))
    assert module.weight.dtype == module.bias.dtype == torch.float64


# ----- test_all.py ----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["16-true", "bf16-true", "64-true"])
@pytest.mark.parametrize("context", ["module_init_context", "tensor_init_context"])
def test_default_dtype_is_restored(policy, context):
    plugin = DualprecPrecision(policy)
    with pytest.raises(RuntimeError, match="foo"), getattr(plugin, context)():
        assert torch.get_default_dtype() is not torch.float32
        raise RuntimeError("foo")
    assert torch.get_default_dtype() is torch.float32


# ----- 32-true: Fabric's base plugin ------------------------------------------------------------
def test_32_true_leaves_inputs_and_outputs_as_they_come():
    plugin = DualprecPrecision("32-true")
    x = torch.ones(2, dtype=torch.float64)
    assert plugin.convert_input(x) is x and plugin.convert_output(x) is x


# ----- test_amp_integration.py ------------------------------------------------------------------
class _MixedPrecisionModule(nn.Module):
    def __init__(self, expected_dtype):
        super().__init__()
        self.expected_dtype = expected_dtype
        self.layer = nn.Linear(32, 2)

    def forward(self, x):
        assert x.dtype == self.expected_dtype
        assert torch.is_autocast_enabled("cpu")
        output = self.layer(x)
        assert output.dtype == self.expected_dtype
        return output


@pytest.mark.parametrize("policy, expected_dtype", [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_amp_training_loop(policy, expected_dtype):
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision(policy)])
    model = _MixedPrecisionModule(expected_dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    for _ in range(3):
        batch = torch.randn(4, 32)
        assert model.layer.weight.dtype == torch.float32
        optimizer.zero_grad()
        output = model(batch)
        assert output.dtype == torch.float32
        loss = nn.functional.mse_loss(output, torch.ones_like(output))
        fabric.backward(loss)
        assert model.layer.weight.grad.dtype == torch.float32
        optimizer.step()


# ----- test_bitsandbytes.py (the parts that run on a CPU) ----------------------------------------
class _QuantModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 64, bias=False)
        self.ln = nn.LayerNorm(64)

    def forward(self, x):
        return self.ln(self.linear(x))


def _bnb_fabric(policy):
    pytest.importorskip("bitsandbytes")
    return Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision(policy)])


@pytest.mark.parametrize("policy, dtype", [("nf4-dq", torch.uint8), ("int8", torch.int8)])
def test_load_quantized_checkpoint(policy, dtype, tmp_path):
    from lightning.fabric.utilities.load import _lazy_load

    fabric = _bnb_fabric(policy)
    model = fabric.setup(_QuantModel())
    state_dict = model.state_dict()
    assert state_dict["linear.weight"].dtype == dtype  # the checkpoint holds the quantized weight
    torch.save(state_dict, tmp_path / "checkpoint.pt")
    x = torch.randn(2, 64)
    fresh = _bnb_fabric(policy).setup(_QuantModel())
    fresh.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert torch.equal(fresh(x), model(x))
    again = _bnb_fabric(policy).setup(_QuantModel())
    again.load_state_dict(_lazy_load(tmp_path / "checkpoint.pt"))  # LitGPT's loader
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("policy", ["nf4", "int8"])
def test_unquantized_state_dict_loads_into_a_quantized_model(policy):
    fabric = _bnb_fabric(policy)
    state_dict = _QuantModel().state_dict()
    model = fabric.setup(_QuantModel())
    before = model.linear.weight.detach().clone()
    keys = model.load_state_dict(state_dict, strict=True)
    assert not keys.missing_keys
    assert not torch.equal(before, model.linear.weight)  # re-quantized from the loaded weight
    assert model.linear.weight.dtype == before.dtype


@pytest.mark.parametrize("policy", ["nf4", "int8"])
def test_meta_device_model_quantizes_on_assign_load(policy):
    fabric = _bnb_fabric(policy)
    with fabric.init_module(empty_init=False), torch.device("meta"):
        model = _QuantModel()
    assert model.linear.weight.device.type == "meta"
    model.load_state_dict(_QuantModel().state_dict(), strict=True, assign=True)
    model = fabric.setup(model)
    assert type(model.module.linear).__name__ != "Linear"
    assert torch.isfinite(model(torch.ones(1, 64))).all()


def test_a_model_without_linear_layers_is_refused():
    from dualprec.errors import QuantizationError

    with pytest.raises(QuantizationError, match="has none"):
        _bnb_fabric("nf4").setup(nn.Conv1d(1, 1, 1))
