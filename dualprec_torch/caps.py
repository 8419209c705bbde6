"""Describe the torch device to the spec's capability checks (`dualprec.DeviceCaps`)."""

from __future__ import annotations

import importlib.util

import torch

from dualprec import DeviceCaps

__all__ = ["device_caps"]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def device_caps(device=None) -> DeviceCaps:
    """What this torch can do on ``device`` (default: the current CUDA device if any, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    common = dict(backend="torch", bitsandbytes=_installed("bitsandbytes"),
                  transformer_engine=_installed("transformer_engine"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f'device "{device}": this torch ({torch.__version__}) sees no CUDA device '
                             "(torch.cuda.is_available() is False); use device=\"cpu\", or a CUDA build of "
                             "torch on a machine with a GPU")
        index = device.index if device.index is not None else torch.cuda.current_device()
        platform = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        return DeviceCaps(platform, name=torch.cuda.get_device_name(index),
                          compute_capability=tuple(torch.cuda.get_device_capability(index)), **common)
    if device.type == "cpu":
        # float16 autocast on CPU arrived in torch 2.3
        return DeviceCaps("cpu", name="cpu", fp16_autocast=_torch_at_least(2, 3), **common)
    raise ValueError(f"device_caps: no capability table for torch device type {device.type!r}; "
                     "use a cpu or cuda device")
