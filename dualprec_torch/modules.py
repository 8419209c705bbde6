"""Apply a Policy to an nn.Module: parameter dtypes per module path, per-module overrides.

`convert_module` casts every floating parameter and buffer to the ``param_dtype`` of the
policy that applies to its module (``policy.for_module(path)``), in place (the Parameter
objects stay the same, so optimizers built before setup keep working), and gives each module
where an override starts a policy scope, so that module computes under its own policy: inputs
cast to its compute dtype, its own compute context, outputs cast to its output dtype.  Modules
without an override compute under the caller's context.

The scope is a pair of torch forward hooks (`_PolicyScope`), not a replaced method: the
module's class, its ``forward`` and every other attribute stay what they were, and
``copy.deepcopy`` / ``torch.save`` of the model carry the hooks with it.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .casts import cast_floating, torch_dtype
from .ops import compute_context

__all__ = ["convert_module", "override_roots"]


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


class _Open(threading.local):
    def __init__(self):
        self.stack = []  # (module, context) of the scopes entered in this thread, innermost last


_OPEN = _Open()


class _PolicyScope:
    """The forward hooks of a module where an override starts: the pre-hook casts the inputs
    to the override's compute dtype and enters its compute context; the forward hook (run also
    when forward raises: ``always_call``) leaves the context and casts the outputs to the
    override's output dtype.  The pre-hook runs after the module's other pre-hooks, the
    forward hook before its other forward hooks, so user hooks see what a caller sees."""

    def __init__(self, policy, device_type: str):
        self.policy, self.device_type = policy, device_type

    def enter(self, module, args, kwargs):
        args, kwargs = cast_floating((args, kwargs), torch_dtype(self.policy.compute_dtype))
        context = compute_context(self.policy, self.device_type, nested=True)
        context.__enter__()
        _OPEN.stack.append((module, context))
        return args, kwargs

    def exit(self, module, args, kwargs, output):
        stack = _OPEN.stack
        if not stack or stack[-1][0] is not module:
            return None  # an earlier pre-hook raised before this scope was entered
        stack.pop()[1].__exit__(None, None, None)
        return cast_floating(output, torch_dtype(self.policy.output_dtype))


def _remove_scope(module: nn.Module) -> None:
    """Remove the scope hooks a previous setup gave ``module`` (set up again: replace, never stack)."""
    for hooks, flags in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                         (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                  module._forward_hooks_always_called))):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), _PolicyScope):
                del hooks[key]
                for flag in flags:
                    flag.pop(key, None)


def _add_scope(module: nn.Module, sub_policy, device_type: str) -> None:
    _remove_scope(module)
    scope = _PolicyScope(sub_policy, device_type)
    module.register_forward_pre_hook(scope.enter, with_kwargs=True)
    module.register_forward_hook(scope.exit, prepend=True, with_kwargs=True, always_call=True)


def convert_module(model: nn.Module, policy, device_type: str) -> nn.Module:
    """Cast ``model`` to ``policy`` in place and install its per-module overrides."""
    for path, module in model.named_modules():
        _cast_tensors(module, torch_dtype(policy.for_module(path).param_dtype))
    for path, module, sub_policy in override_roots(model, policy):
        _add_scope(module, sub_policy, device_type)
    return model
