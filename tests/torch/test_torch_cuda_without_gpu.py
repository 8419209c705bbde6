"""16-mixed (and bf16-mixed) on CUDA, checked without a GPU: the device argument, the
autocast device chosen, where the loss scale lives, and the plugin against Fabric's own
MixedPrecision on the same device.  A CUDA device is simulated by patching
``torch.cuda.is_available`` / ``is_bf16_supported`` and the capability query: only the
choices dualprec makes are checked here, no CUDA kernel runs."""


import pytest
import torch
from torch import nn

import dualprec_torch.precision as precision_module
from dualprec import DeviceCaps
from dualprec_torch import Precision

H100 = DeviceCaps("cuda", name="NVIDIA H100", compute_capability=(9, 0), backend="torch")
DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(precision_module, "device_caps", lambda device=None: H100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only torch")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_on_cpu_only_torch_is_one_line_naming_the_fix(device):
    with pytest.raises(ValueError) as err:
        Precision("16-mixed", device=device)
    message = str(err.value)
    assert "\n" not in message
    assert "sees no CUDA device" in message and 'use device="cpu", or a CUDA build of torch' in message


@pytest.mark.parametrize("device, match", [
    ("tpu", r"'tpu' is not a torch device .*use e\.g\. \"cpu\", \"cuda\""),
    ("mps", r"no capability table for torch device type 'mps'; use a cpu or cuda device"),
    (3.5, r"3\.5 is not a torch device"),
])
def test_device_argument_is_validated(device, match):
    with pytest.raises(ValueError, match=match) as err:
        Precision("16-mixed", device=device)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("policy", list(DTYPES))
def test_autocast_targets_cuda_with_the_compute_dtype(policy, fake_cuda):
    precision = Precision(policy, device="cuda")
    assert precision.device_type == "cuda" and precision.caps is H100
    with precision.autocast():
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == DTYPES[policy]
        assert not torch.is_autocast_enabled("cpu")  # CUDA is plain torch.autocast: no CPU emulation
    assert not torch.is_autocast_enabled("cuda")


@pytest.mark.parametrize("policy", list(DTYPES))
def test_plugin_autocasts_as_fabrics_mixed_precision_on_cuda(policy, fake_cuda):
    pytest.importorskip("lightning")
    from lightning.fabric.plugins.precision import MixedPrecision

    from dualprec_torch.fabric import DualprecPrecision

    ours, theirs = DualprecPrecision(policy, device="cuda"), MixedPrecision(policy, device="cuda")
    seen = []
    for plugin in (ours, theirs):
        with plugin.forward_context():
            seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                         torch.is_autocast_enabled("cpu")))
        assert plugin.convert_input(torch.ones(1)).dtype == DTYPES[policy]
    assert seen[0] == seen[1] == (True, DTYPES[policy], False)
    # the loss scale: Fabric builds GradScaler(device="cuda") for 16-mixed only, with 2**16
    assert (theirs.scaler is not None) == (policy == "16-mixed") == ours.policy.loss_scale.enabled
    if theirs.scaler is not None:
        assert theirs.scaler._device == "cuda" and ours.scale == theirs.scaler._init_scale == 2.0**16


def test_loss_scale_lives_on_the_losss_device(fake_cuda):
    """GradScaler keeps its scale on its device; ours follows the loss, so no host transfer
    per step (the meta device stands in for the GPU)."""
    precision = Precision("16-mixed", device="cuda")
    loss = torch.ones((), device="meta", requires_grad=True)
    scaled = precision.scale_loss(loss)
    assert scaled.device.type == "meta" and precision._scaler._scale.device.type == "meta"
    assert precision._scaler._counter.device.type == "meta"


def test_a_cpu_model_under_a_cuda_precision_is_said(fake_cuda):
    """Autocast on CUDA does not reach a model left on the CPU: its forward would run in
    float32, silently."""
    precision = Precision("16-mixed", device="cuda")
    model = precision.setup(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r'model is on cpu but this Precision autocasts cuda.*float32, not '
                                         r'float16; pass device="cpu"'):
        with precision.autocast():
            assert model(torch.ones(2, 4)).dtype == torch.float32
