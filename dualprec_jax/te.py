"""Transformer Engine for JAX (`transformer_engine.jax`) under a dualprec Policy.

When the FP8 engine resolves to Transformer Engine (``engine=transformer-engine``, or ``auto``
on a CUDA GPU where TE imports), `dualprec_jax.Precision` runs linen models inside
`autocast`: TE's own context manager (``te.autocast(enabled, recipe, mesh_resource)`` in TE
2.x, ``te.fp8_autocast(enabled, fp8_recipe, mesh_resource)`` before it) with the recipe built
from the Policy, and stock ``nn.Dense`` / ``nn.DenseGeneral`` layers take TE's quantized GEMM
(``transformer_engine.jax.flax.make_dot_general_cls(recipe)``).  TE keeps its FP8 metadata
(scales, amax histories) in its own Flax collection, ``fp8_metas`` (`FP8_COLLECTION`), which
the training step carries like any other non-param collection.

The mapping (Policy -> TE recipe and arguments) is tested against a stand-in module; it has
not run against a real TE install.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from typing import Any

from dualprec.errors import UnsupportedPolicyError
from dualprec.policy import FP8Recipe, Policy

__all__ = ["FP8_COLLECTION", "available", "te_recipe", "autocast", "dot_general_cls", "recipe_kwargs"]

FP8_COLLECTION = "fp8_metas"  # TE's NVTE_FP8_COLLECTION_NAME


def _te():
    try:
        return importlib.import_module("transformer_engine.jax")
    except ImportError as exc:
        raise UnsupportedPolicyError(
            "fp8 engine transformer-engine: transformer_engine.jax does not import "
            f"({exc}); install Transformer Engine for JAX on a CUDA GPU, or use fp8=...(engine=native)") from None


def available() -> bool:
    """True when ``transformer_engine.jax`` imports."""
    try:
        importlib.import_module("transformer_engine.jax")
        return True
    except ImportError:
        return False


def collection_name() -> str:
    """TE's FP8 collection name (``fp8_metas``), read from TE when it says."""
    try:
        quantize = importlib.import_module("transformer_engine.jax.quantize")
        return getattr(quantize, "NVTE_FP8_COLLECTION_NAME", FP8_COLLECTION)
    except ImportError:
        return FP8_COLLECTION


def recipe_kwargs(recipe: FP8Recipe) -> tuple[str, dict]:
    """The TE recipe class name and its keyword arguments for a dualprec FP8Recipe
    (formats as TE ``Format`` member names)."""
    if recipe.block_scaled:
        raise UnsupportedPolicyError(f"fp8={recipe.scaling}: the Transformer Engine adapter maps delayed and "
                                     "current scaling only; use engine=native")
    fmt = {"hybrid": "HYBRID", "e4m3": "E4M3"}[recipe.format]
    if recipe.scaling == "current":
        return "Float8CurrentScaling", {"fp8_format": fmt}
    return "DelayedScaling", {"margin": int(recipe.margin), "fp8_format": fmt,
                              "amax_history_len": int(recipe.history_len),
                              "amax_compute_algo": recipe.amax_algo}


def te_recipe(recipe: FP8Recipe):
    """The ``transformer_engine.common.recipe`` object for ``recipe``."""
    _te()
    module = importlib.import_module("transformer_engine.common.recipe")
    name, kwargs = recipe_kwargs(recipe)
    kwargs["fp8_format"] = getattr(module.Format, kwargs["fp8_format"])
    return getattr(module, name)(**kwargs)


def _default_mesh_resource():
    try:
        return importlib.import_module("transformer_engine.jax.sharding").MeshResource()
    except (ImportError, AttributeError):
        return None


def _te_autocast(te, enabled: bool, recipe_obj, mesh_resource):
    """TE 2.x ``autocast(enabled, recipe, mesh_resource)``; the older ``fp8_autocast``."""
    fn = getattr(te, "autocast", None)
    if fn is None:
        fn = getattr(te, "fp8_autocast", None)
    if fn is None:
        raise UnsupportedPolicyError("transformer_engine.jax has neither autocast nor fp8_autocast; "
                                     "this TE version is not supported")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C-level callable
        params = {}
    kwargs: dict[str, Any] = {"enabled": enabled}
    kwargs["fp8_recipe" if "fp8_recipe" in params and "recipe" not in params else "recipe"] = recipe_obj
    if mesh_resource is not None:
        kwargs["mesh_resource"] = mesh_resource
    return fn(**kwargs)


def dot_general_cls(recipe: FP8Recipe):
    """TE's quantized-GEMM module class for an ``nn.Dense``'s ``dot_general_cls``."""
    _te()
    flax_mod = importlib.import_module("transformer_engine.jax.flax")
    make = getattr(flax_mod, "make_dot_general_cls", None)
    if make is None:
        raise UnsupportedPolicyError("transformer_engine.jax.flax has no make_dot_general_cls (TE >= 2.x "
                                     "has it); use TE's own layers, or fp8=...(engine=native)")
    return make(te_recipe(recipe))


def _intercept(policy: Policy, next_fun, args, kwargs, context):
    from .fp8 import FP8_MODULES, recipe_of

    module = context.module
    if context.method_name != "__call__" or not isinstance(module, FP8_MODULES):
        return next_fun(*args, **kwargs)
    recipe = recipe_of(policy, ".".join(str(p) for p in module.path))
    if recipe is None or module.dot_general is not None or module.dot_general_cls is not None:
        return next_fun(*args, **kwargs)
    object.__setattr__(module, "dot_general_cls", _cls_for(recipe))
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "dot_general_cls", None)


@functools.lru_cache(maxsize=None)
def _cls_for(recipe: FP8Recipe):
    return dot_general_cls(recipe)


@contextlib.contextmanager
def autocast(policy: Any, *, enabled: bool = True, mesh_resource=None, inner=None):
    """TE's autocast with the Policy's recipe (its top-level one; TE has one recipe per
    context), and stock Dense layers under an FP8 recipe on TE's quantized GEMM."""
    import flax.linen as nn

    policy = Policy.parse(policy)
    recipe = policy.fp8_recipe
    if recipe is None:
        raise UnsupportedPolicyError(f'"{policy}" has no fp8 recipe for Transformer Engine')
    te = _te()
    mesh_resource = _default_mesh_resource() if mesh_resource is None else mesh_resource
    with contextlib.ExitStack() as stack:
        stack.enter_context(_te_autocast(te, enabled, te_recipe(recipe), mesh_resource))
        if enabled:
            stack.enter_context(nn.intercept_methods(functools.partial(_intercept, policy)))
        if inner is not None:
            stack.enter_context(inner)
        yield
