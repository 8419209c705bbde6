"""device_caps describes this torch to the spec; Precision.check asks the spec."""

import importlib.util

import pytest
import torch

from dualprec import DeviceCaps
from dualprec_torch import Precision, device_caps


def test_cpu_caps():
    caps = device_caps("cpu")
    assert isinstance(caps, DeviceCaps)
    assert (caps.platform, caps.backend, caps.compute_capability) == ("cpu", "torch", None)
    assert caps.bitsandbytes == (importlib.util.find_spec("bitsandbytes") is not None)
    assert caps.transformer_engine == (importlib.util.find_spec("transformer_engine") is not None)
    assert caps.fp16_autocast  # torch >= 2.3


def test_default_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        assert device_caps().platform in ("cuda", "rocm") and device_caps().compute_capability
    else:
        assert device_caps() == device_caps("cpu")


def test_check_uses_the_spec():
    report = Precision("16-mixed").check("cpu")
    assert report.ok and any("float16 on CPU" in n.message for n in report.notes)
    assert Precision("bf16-mixed").check("cpu").ok


def test_unknown_device_type():
    with pytest.raises(ValueError, match="cpu or cuda"):
        device_caps("meta")
