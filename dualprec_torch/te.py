"""The Transformer Engine adapter: a Policy's FP8 recipe carried out by TE's own layers.

Written against Transformer Engine 2.x's documented PyTorch API, with the older names as
fallbacks: ``te.autocast(enabled, recipe, amax_reduction_group)`` (``fp8_autocast(enabled,
fp8_recipe, fp8_group)`` before TE 2.9), ``te.quantized_model_init`` (``fp8_model_init``),
``te.Linear`` / ``te.LayerNorm`` / ``te.LayerNormLinear``, and the recipes of
``transformer_engine.common.recipe`` (``DelayedScaling``, ``Float8CurrentScaling``,
``Format``). It has not run against a real TE install (TE needs a CUDA build); its tests
drive it through a stand-in ``transformer_engine`` package.

What it does to a model (`convert_module`): every ``nn.Linear`` / ``nn.LayerNorm`` whose
policy has an FP8 recipe becomes its TE counterpart with the same weights, a LayerNorm
directly followed by a Linear inside an ``nn.Sequential`` becomes one ``te.LayerNormLinear``,
and the model's forward runs inside ``te.autocast`` with the recipe built from the Policy.
Linears TE cannot run in FP8 (a weight whose leading dimension, out_features, is not
divisible by 8 or whose last, in_features, is not by 16) stay torch layers, with a warning
naming them. TE refuses DelayedScaling under torch.compile: compile with current scaling.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
from torch import nn

from dualprec.errors import UnsupportedPolicyError

from .casts import torch_dtype

__all__ = ["available", "import_te", "te_recipe", "autocast", "init_context", "convert_module", "te_shape_ok"]

_INSTALL_HINT = ('Transformer Engine is not installed (pip install "dualprec[te]" on a CUDA machine, '
                 'or transformer_engine[pytorch]); use fp8 engine=native for the torch._scaled_mm engine')
_WRAPPED = "_dualprec_te_autocast"


def import_te():
    """(transformer_engine.pytorch, transformer_engine.common.recipe); a clear error without TE."""
    try:
        te = importlib.import_module("transformer_engine.pytorch")
        recipe = importlib.import_module("transformer_engine.common.recipe")
    except ImportError as e:
        raise UnsupportedPolicyError(f"{_INSTALL_HINT} ({e})") from None
    return te, recipe


def available() -> bool:
    """Whether transformer_engine.pytorch imports."""
    try:
        import_te()
    except UnsupportedPolicyError:
        return False
    return True


def te_recipe(fp8_recipe):
    """The TE recipe object for a `dualprec.FP8Recipe`: DelayedScaling(fp8_format, margin,
    amax_history_len, amax_compute_algo) or Float8CurrentScaling(fp8_format)."""
    if fp8_recipe.block_scaled:
        raise UnsupportedPolicyError(f"fp8={fp8_recipe.scaling}: the Transformer Engine adapter maps delayed and "
                                     "current scaling only; use engine=native")
    _, recipes = import_te()
    fmt = recipes.Format.HYBRID if fp8_recipe.format == "hybrid" else recipes.Format.E4M3
    if fp8_recipe.scaling == "current":
        if not hasattr(recipes, "Float8CurrentScaling"):
            raise UnsupportedPolicyError("this Transformer Engine has no Float8CurrentScaling (TE >= 2.2); "
                                         "use fp8=delayed or engine=native")
        return recipes.Float8CurrentScaling(fp8_format=fmt)
    return recipes.DelayedScaling(fp8_format=fmt, margin=fp8_recipe.margin,
                                  amax_history_len=fp8_recipe.history_len,
                                  amax_compute_algo=fp8_recipe.amax_algo)


def autocast(fp8_recipe, enabled: bool = True, group=None):
    """``te.autocast(enabled, recipe, amax_reduction_group)``; ``fp8_autocast`` on older TE."""
    te, _ = import_te()
    recipe = te_recipe(fp8_recipe)
    if hasattr(te, "autocast"):
        return te.autocast(enabled=enabled, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=group)


def init_context(fp8_recipe, enabled: bool = True):
    """``te.quantized_model_init(enabled, recipe)`` (``fp8_model_init`` on older TE): TE modules
    created inside keep their weights in FP8 only."""
    te, _ = import_te()
    recipe = te_recipe(fp8_recipe)
    if hasattr(te, "quantized_model_init"):
        return te.quantized_model_init(enabled=enabled, recipe=recipe)
    return te.fp8_model_init(enabled=enabled, recipe=recipe)


def te_shape_ok(linear: nn.Linear) -> bool:
    """Whether TE runs this Linear in FP8: its FP8 GEMMs take 2-D operands whose leading
    dimension is divisible by 8 and last by 16, so the weight (out_features, in_features)
    needs out_features % 8 == 0 and in_features % 16 == 0. (The activations need the
    same at run time: tokens % 8 == 0, which TE itself checks.)"""
    return linear.out_features % 8 == 0 and linear.in_features % 16 == 0


def _te_linear(te, linear: nn.Linear, dtype: torch.dtype):
    new = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    params_dtype=dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _te_layernorm(te, norm: nn.LayerNorm, dtype: torch.dtype):
    (hidden,) = norm.normalized_shape
    new = te.LayerNorm(hidden, eps=norm.eps, params_dtype=dtype, device=norm.weight.device)
    with torch.no_grad():
        new.weight.copy_(norm.weight)
        new.bias.copy_(norm.bias)
    return new


def _te_layernorm_linear(te, norm: nn.LayerNorm, linear: nn.Linear, dtype: torch.dtype):
    new = te.LayerNormLinear(linear.in_features, linear.out_features, eps=norm.eps,
                             bias=linear.bias is not None, params_dtype=dtype,
                             device=linear.weight.device)
    with torch.no_grad():
        new.layer_norm_weight.copy_(norm.weight)
        new.layer_norm_bias.copy_(norm.bias)
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _fusable_norm(module) -> bool:
    return (type(module) is nn.LayerNorm and len(module.normalized_shape) == 1
            and module.elementwise_affine and module.bias is not None)


def _plan(model: nn.Module, policy, module_filter_fn):
    """{path: ("linear" | "layernorm" | "layernorm_linear" | "fused_away", ...)}, plus the
    paths skipped (path -> why)."""
    from .fp8 import fp8_layers

    chosen = {path: m for path, m, _ in fp8_layers(model, policy, module_filter_fn, types=(nn.Linear, nn.LayerNorm))}
    plan, skipped = {}, {}
    for path, module in chosen.items():
        if isinstance(module, nn.Linear) and not te_shape_ok(module):
            skipped[path] = (f"in_features={module.in_features}, out_features={module.out_features} "
                             "(TE's FP8 GEMMs need out_features % 8 == 0 and in_features % 16 == 0)")
        elif isinstance(module, nn.LayerNorm) and not _fusable_norm(module):
            skipped[path] = "a LayerNorm over several dimensions or without affine weight and bias"
    for path, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            p1, p2 = (f"{path}.{first}" if path else first), (f"{path}.{second}" if path else second)
            if (p1 in chosen and p2 in chosen and p1 not in skipped and p2 not in skipped
                    and type(chosen[p1]) is nn.LayerNorm and type(chosen[p2]) is nn.Linear
                    and p1 not in plan and chosen[p1].normalized_shape[0] == chosen[p2].in_features):
                plan[p1], plan[p2] = ("layernorm_linear", p2), ("fused_away",)
    for path, module in chosen.items():
        if path in plan or path in skipped:
            continue
        plan[path] = ("linear",) if type(module) is nn.Linear else ("layernorm",)
    return plan, skipped


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _wrap_forward(model: nn.Module, fp8_recipe) -> None:
    if _WRAPPED in model.__dict__:
        model.forward = model.__dict__[_WRAPPED]
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with autocast(fp8_recipe):
            return original(*args, **kwargs)

    model.forward = forward
    setattr(model, _WRAPPED, original)


def convert_module(model: nn.Module, policy, *, module_filter_fn=None) -> nn.Module:
    """Swap the model's FP8 layers for TE layers (see the module docstring) in place and
    run its forward under ``te.autocast``. Returns the model (a bare ``nn.Linear`` or
    ``nn.LayerNorm`` passed as the model comes back as the TE layer)."""
    te, _ = import_te()
    plan, skipped = _plan(model, policy, module_filter_fn)
    for path, why in skipped.items():
        warnings.warn(f"Transformer Engine cannot run {path or 'the model'} in FP8: {why}; it stays a torch "
                      "layer under the compute policy", stacklevel=3)
    modules = dict(model.named_modules())
    root = model
    for path, (kind, *rest) in plan.items():
        module = modules[path]
        # TE layers are built in the policy's param dtype (TE sizes its buffers by params_dtype),
        # not cast after the fact: the weights are copied in, rounded once
        dtype = torch_dtype(policy.for_module(rest[0] if rest else path).param_dtype)
        if kind == "linear":
            new = _te_linear(te, module, dtype)
        elif kind == "layernorm":
            new = _te_layernorm(te, module, dtype)
        elif kind == "layernorm_linear":
            new = _te_layernorm_linear(te, module, modules[rest[0]], dtype)
        else:
            new = nn.Identity()
        if path:
            _set(model, path, new)
        else:
            root = new
    recipe = policy.fp8_recipe
    if plan:
        _wrap_forward(root, recipe)
    return root

