"""The Lightning Fabric plugin against Fabric's own string precisions, and its state in
fabric.save / fabric.load."""

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")
from lightning.fabric import Fabric  # noqa: E402

from dualprec_torch.fabric import DualprecPrecision  # noqa: E402

STEPS = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)


def _train(fabric, steps=STEPS, multiplier=1.0):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    x, y = _data()
    seen = {}
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        out = model(x)
        loss = nn.functional.mse_loss(out.float(), y) * (multiplier if step == 1 else 1.0)
        fabric.backward(loss)
        if step == 0:
            seen["grad"] = {n: p.grad.dtype for n, p in model.module.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    seen["out"] = out.dtype
    seen["param"] = {n: p.dtype for n, p in model.module.named_parameters()}
    return model, optimizer, losses, seen


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-true"])
def test_same_dtypes_and_losses_as_fabrics_own_precision(precision):
    ours = _train(Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision(precision)]))
    theirs = _train(Fabric(accelerator="cpu", devices=1, precision=precision))
    assert ours[3] == theirs[3]
    assert ours[2] == theirs[2]  # Linear/ReLU/MSE: every op agrees, so the losses are bit-equal
    for (n, a), (_, b) in zip(ours[0].named_parameters(), theirs[0].named_parameters()):
        assert torch.equal(a, b), n


def test_16_mixed_runs_float16_on_cpu_where_fabric_substitutes_bf16():
    """Fabric turns precision="16-mixed" into bf16-mixed on CPU (with a warning); the plugin
    runs the policy it was given: float16 autocast with dynamic loss scaling."""
    with pytest.warns(UserWarning, match="Using `precision='bf16-mixed'` instead"):
        fabric = Fabric(accelerator="cpu", devices=1, precision="16-mixed")
    theirs = _train(fabric)
    assert fabric.strategy.precision.precision == "bf16-mixed"
    plugin = DualprecPrecision("16-mixed")
    ours = _train(Fabric(accelerator="cpu", devices=1, plugins=[plugin]))
    assert plugin.dualprec.scale == 2.0**16  # dynamic loss scaling is on
    assert ours[3]["out"] == torch.float32  # 16-mixed outputs are cast back to float32 (Fabric's rule)
    assert ours[3]["param"] == {n: torch.float32 for n in ours[3]["param"]}
    assert ours[2] != theirs[2]


def test_scaler_state_survives_fabric_save_and_load(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision("16-mixed")])
    model, optimizer, _, _ = _train(fabric, multiplier=float("inf"))  # one overflow: scale halves
    plugin = fabric.strategy.precision
    assert plugin.dualprec.scale == 2.0**15
    fabric.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "precision": plugin})

    fresh = Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision("16-mixed")])
    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    model2, opt2 = fresh.setup(model2, opt2)
    assert fresh.strategy.precision.dualprec.scale == 2.0**16
    fresh.load(tmp_path / "ckpt", {"model": model2, "optimizer": opt2, "precision": fresh.strategy.precision})
    assert fresh.strategy.precision.dualprec.scale == 2.0**15
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_loading_another_policys_state_is_refused(tmp_path):
    a = DualprecPrecision("16-mixed")
    b = DualprecPrecision("bf16-mixed")
    with pytest.raises(ValueError, match="16-mixed"):
        b.load_state_dict(a.state_dict())


def test_overrides_in_one_plugin_string():
    """What Fabric's string precisions cannot say: a bf16 model with its head in float32."""
    plugin = DualprecPrecision("bf16-true,@2=32-true")
    model, _, losses, seen = _train(Fabric(accelerator="cpu", devices=1, plugins=[plugin]))
    assert seen["param"] == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16,
                             "2.weight": torch.float32, "2.bias": torch.float32}
    assert seen["grad"] == seen["param"]
    assert losses[-1] < losses[0]
