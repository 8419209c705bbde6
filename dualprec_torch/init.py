"""Create modules directly in a policy's parameter dtype (`Precision.init_module`).

Inside the context torch's default dtype is the policy's ``param_dtype`` (so a bf16-true
model is never materialised in float32), modules land on the target device when one is
given, complex parameters and buffers registered there become complex128 under a float64
policy, and ``empty_init=True`` skips the weight initialisers (for weights that a
checkpoint will overwrite).  Every setting is restored when the block exits or raises.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules import module as module_mod
from torch.overrides import TorchFunctionMode

from .casts import default_dtype, torch_dtype

__all__ = ["init_context", "SkipInit"]


class SkipInit(TorchFunctionMode):
    """Turn `torch.nn.init` initialisers into no-ops: parameters keep torch.empty's memory."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def _complex128(module, name, tensor):
    if tensor is not None and tensor.dtype == torch.complex64:
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(tensor.data.to(torch.complex128), tensor.requires_grad)
        return tensor.to(torch.complex128)
    return None


@contextlib.contextmanager
def init_context(policy, device=None, empty_init: bool = False):
    with contextlib.ExitStack() as stack:
        stack.enter_context(default_dtype(torch_dtype(policy.param_dtype)))
        if device is not None:
            stack.enter_context(torch.device(device))
        if policy.param_dtype == "float64":
            # the default dtype makes torch's *default* complex dtype complex128; these hooks
            # also catch complex64 tensors created with an explicit dtype
            stack.callback(module_mod.register_module_buffer_registration_hook(_complex128).remove)
            stack.callback(module_mod.register_module_parameter_registration_hook(_complex128).remove)
        if empty_init:
            stack.enter_context(SkipInit())
        yield
