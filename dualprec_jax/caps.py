"""What the JAX device can run, described as a `dualprec.DeviceCaps` for the spec's checks."""

from __future__ import annotations

import importlib.util

import jax

from dualprec import DeviceCaps

__all__ = ["device_caps"]


def _platform(device) -> str:
    if device.platform in ("cpu", "tpu", "cuda", "rocm"):
        return device.platform
    if device.platform != "gpu":
        raise ValueError(f"device_caps: no capability table for JAX platform {device.platform!r} "
                         f"({device}); dualprec knows cpu, gpu (CUDA/ROCm) and tpu")
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version or "hip" in version else "cuda"


def _compute_capability(device) -> tuple[int, int] | None:
    cc = getattr(device, "compute_capability", None)
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def device_caps(device=None) -> DeviceCaps:
    """Capabilities of ``device`` (default: JAX's first device), with backend="jax"."""
    device = jax.devices()[0] if device is None else device
    platform = _platform(device)
    return DeviceCaps(
        platform=platform,
        name=str(getattr(device, "device_kind", "")),
        compute_capability=_compute_capability(device) if platform == "cuda" else None,
        backend="jax",
        bitsandbytes=False,  # bitsandbytes is a torch library
        transformer_engine=importlib.util.find_spec("transformer_engine") is not None,
    )
