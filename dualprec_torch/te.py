"""The Transformer Engine adapter: a Policy's FP8 recipe carried out by TE's own layers.

Written against Transformer Engine 2.x's documented PyTorch API, with the older names as
fallbacks: ``te.autocast(enabled, recipe, amax_reduction_group)`` (``fp8_autocast(enabled,
fp8_recipe, fp8_group)`` before TE 2.9), ``te.quantized_model_init`` (``fp8_model_init``),
``te.Linear`` / ``te.LayerNorm`` / ``te.LayerNormLinear``, and the recipes of
``transformer_engine.common.recipe`` (``DelayedScaling``, ``Float8CurrentScaling``,
``MXFP8BlockScaling``, ``NVFP4BlockScaling``, ``Format``; the mapping is
`dualprec.te_recipes`, shared with the JAX adapter). It has not run against a real TE install
(TE needs a CUDA build); its tests drive it through a stand-in ``transformer_engine`` package.

Under TE a block recipe runs TE's kernels: the numbers of the recipe, not dualprec's bits.
TE draws NVFP4 stochastic-rounding bits from its own generator and uses one fixed Hadamard
sign vector for every layer, where the native engine draws both from the layer's
``[seed, step]`` state; so a TE run is not bit-identical to the native or JAX run, and its
checkpoint has no ``blockscale.state`` to resume them from.

What it does to a model (`convert_module`): every ``nn.Linear`` / ``nn.LayerNorm`` whose
policy has an FP8 recipe becomes its TE counterpart with the same weights, a LayerNorm
directly followed by a Linear inside an ``nn.Sequential`` becomes one ``te.LayerNormLinear``,
and the model's forward runs inside ``te.autocast`` with the recipe built from the Policy.
Linears TE cannot run in FP8 (a weight whose leading dimension, out_features, is not
divisible by 8 or whose last, in_features, is not by 16; by 32 and 32 under MXFP8, 16 and 16
under NVFP4) stay torch layers, with a warning naming them. TE refuses DelayedScaling under torch.compile: compile with current scaling.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch import nn

from dualprec.errors import UnsupportedPolicyError
from dualprec.te_recipes import TE_CLASSES, TE_TORCH_SINCE, fp8_token, te_recipe_args, te_refusal

from .casts import torch_dtype

__all__ = ["available", "import_te", "te_recipe", "supports", "autocast", "init_context", "convert_module", "te_shape_ok"]

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
    """The TE recipe object for a `dualprec.FP8Recipe` (the table of `dualprec.te_recipes`):
    DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling (rounding=rceil only) or
    NVFP4BlockScaling (its three switches always passed).

    Raises:
        UnsupportedPolicyError: An option TE has no equivalent for (row-wise recipes, an MX
            rounding other than rceil), or a recipe class this TE does not have yet.
    """
    name, kwargs = te_recipe_args(fp8_recipe)
    _, recipes = import_te()
    cls = getattr(recipes, name, None)
    if cls is None:
        raise UnsupportedPolicyError(f"fp8={fp8_recipe.scaling}: this Transformer Engine has no {name} "
                                     f"(TE >= {TE_TORCH_SINCE[name]}); upgrade TE or use engine=native")
    if "fp8_format" in kwargs:
        kwargs["fp8_format"] = getattr(recipes.Format, kwargs["fp8_format"])
    return cls(**kwargs)


def supports(fp8_recipe) -> bool:
    """Whether the installed TE carries out ``fp8_recipe`` as the policy defines it (for
    ``engine=auto``: otherwise the native engine runs it)."""
    if te_refusal(fp8_recipe) is not None or not available():
        return False
    _, recipes = import_te()
    return hasattr(recipes, TE_CLASSES[fp8_recipe.scaling])


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


#: (out_features multiple, in_features multiple) TE needs of a weight to quantize it, per recipe
#: class: FP8 GEMMs take operands whose leading dimension is divisible by 8 and last by 16;
#: MXFP8 and NVFP4 quantize both dimensions in blocks (32, 16: TE's ``is_quantizable``)
_TE_SHAPE = {"DelayedScaling": (8, 16), "Float8CurrentScaling": (8, 16), "MXFP8BlockScaling": (32, 32),
             "NVFP4BlockScaling": (16, 16)}


def te_shape_ok(linear: nn.Linear, fp8_recipe=None) -> bool:
    """Whether TE runs this Linear under ``fp8_recipe`` (None: per-tensor FP8): the weight
    (out_features, in_features) needs out_features % 8 == 0 and in_features % 16 == 0 for
    per-tensor FP8, both divisible by 32 for MXFP8 and by 16 for NVFP4. (The activations
    need the same of their token count at run time, which TE itself checks.)"""
    name = "DelayedScaling" if fp8_recipe is None else TE_CLASSES.get(fp8_recipe.scaling, "DelayedScaling")
    rows, cols = _TE_SHAPE[name]
    return linear.out_features % rows == 0 and linear.in_features % cols == 0


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
    recipe = policy.fp8_recipe
    rows, cols = _TE_SHAPE[TE_CLASSES.get(recipe.scaling, "DelayedScaling")] if recipe is not None else (8, 16)
    plan, skipped = {}, {}
    for path, module in chosen.items():
        if isinstance(module, nn.Linear) and not te_shape_ok(module, recipe):
            skipped[path] = (f"in_features={module.in_features}, out_features={module.out_features} "
                             f"(TE's {recipe.scaling} GEMMs need out_features % {rows} == 0 and "
                             f"in_features % {cols} == 0)")
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
    """Run the model's forward under ``te.autocast(recipe)`` through forward hooks (a pre-hook
    enters it, a hook that runs even when forward raises leaves it); the model's own ``forward``
    is never replaced. Converting again replaces the hooks."""
    for handle in model.__dict__.get(_WRAPPED, ()):
        handle.remove()
    open_contexts: list = []  # one per call in flight (a forward may call the model again)

    def enter(module, args):
        ctx = autocast(fp8_recipe)
        ctx.__enter__()
        open_contexts.append(ctx)

    def leave(module, args, output):
        open_contexts.pop().__exit__(None, None, None)

    model.__dict__[_WRAPPED] = (model.register_forward_pre_hook(enter),
                                model.register_forward_hook(leave, always_call=True))


def convert_module(model: nn.Module, policy, *, module_filter_fn=None) -> nn.Module:
    """Swap the model's FP8 layers for TE layers (see the module docstring) in place and
    run its forward under ``te.autocast``. Returns the model (a bare ``nn.Linear`` or
    ``nn.LayerNorm`` passed as the model comes back as the TE layer)."""
    te, _ = import_te()
    recipes = sorted({fp8_token(q.fp8) for _, q in policy.policies() if q.fp8 is not None})
    if len(recipes) > 1:
        raise UnsupportedPolicyError(f"Transformer Engine runs one recipe per autocast; this policy has "
                                     f"{len(recipes)} ({', '.join(recipes)}); use engine=native, or one fp8 recipe")
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

