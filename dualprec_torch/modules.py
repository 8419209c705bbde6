"""Apply a Policy to an nn.Module: parameter dtypes per module path, per-module overrides.

`convert_module` casts every floating parameter and buffer to the ``param_dtype`` of the
policy that applies to its module (``policy.for_module(path)``), in place (the Parameter
objects stay the same, so optimizers built before setup keep working), and wraps the
forward of each module where an override starts, so that module computes under its own
policy: inputs cast to its compute dtype, its own compute context, outputs cast to its
output dtype.  Modules without an override compute under the caller's context.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .casts import cast_floating, torch_dtype
from .ops import compute_context

__all__ = ["convert_module", "override_roots"]

_WRAPPED = "_dualprec_override"


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def override_roots(model: nn.Module, policy) -> list[tuple[str, nn.Module, object]]:
    """(path, module, policy) for each module whose policy differs from its parent's."""
    if not policy.overrides:
        return []
    roots = []
    for path, module in model.named_modules():
        if path and policy.for_module(path) != policy.for_module(_parent(path)):
            roots.append((path, module, policy.for_module(path)))
    return roots


def _cast_tensors(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast this module's own floating params and buffers (not its children's) in place."""
    for param in module.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            if param.grad is not None:
                param.grad = param.grad.to(dtype)
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
            module._buffers[name] = buf.to(dtype)


def _override_forward(self, *args, **kwargs):
    """The forward of a module where an override starts (bound to that module, so
    ``copy.deepcopy`` of the model binds the copy's to the copy)."""
    original, sub_policy, device_type = getattr(self, _WRAPPED)
    compute = torch_dtype(sub_policy.compute_dtype)
    args, kwargs = cast_floating((args, kwargs), compute)
    with compute_context(sub_policy, device_type, nested=True):
        result = original(*args, **kwargs)
    return cast_floating(result, torch_dtype(sub_policy.output_dtype))


def _wrap_forward(module: nn.Module, sub_policy, device_type: str) -> None:
    if getattr(module, _WRAPPED, None) is not None:
        # set up again (e.g. a second Precision): replace, never stack, the wrapper
        module.forward = getattr(module, _WRAPPED)[0]
    # Both are bound methods of ``module`` (not closures over it): copy.deepcopy copies a bound
    # method's ``__self__`` through its memo, so a deep copy of the model runs its own weights.
    setattr(module, _WRAPPED, (module.forward, sub_policy, device_type))
    module.forward = types.MethodType(_override_forward, module)


def convert_module(model: nn.Module, policy, device_type: str) -> nn.Module:
    """Cast ``model`` to ``policy`` in place and install its per-module overrides."""
    for path, module in model.named_modules():
        _cast_tensors(module, torch_dtype(policy.for_module(path).param_dtype))
    for path, module, sub_policy in override_roots(model, policy):
        _wrap_forward(module, sub_policy, device_type)
    return model
