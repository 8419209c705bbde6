"""Transformer Engine for JAX (`transformer_engine.jax`) under a dualprec Policy.

When the FP8 engine resolves to Transformer Engine (``engine=transformer-engine``, or ``auto``
on a CUDA GPU where TE imports), `dualprec_jax.Precision` runs linen models inside
`autocast`: TE's own context manager (``te.autocast(enabled, recipe, mesh_resource)`` in TE
2.x, ``te.fp8_autocast(enabled, fp8_recipe, mesh_resource)`` before it) with the recipe built
from the Policy, and stock ``nn.Dense`` / ``nn.DenseGeneral`` layers take TE's quantized GEMM
(``transformer_engine.jax.flax.make_dot_general_cls(recipe)``).  TE keeps its FP8 metadata
(scales, amax histories) in its own Flax collection, ``fp8_metas`` (`FP8_COLLECTION`), which
the training step carries like any other non-param collection.

The mapping (Policy -> TE recipe and arguments) is `dualprec.te_recipes`, shared with the
torch adapter: DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling (rounding=rceil only)
and NVFP4BlockScaling (its three switches); row-wise recipes and other MX roundings are
refused, as is a recipe the installed TE-JAX does not run (TE-JAX has four of TE's six
recipes: no Float8BlockScaling).  Under TE an NVFP4 recipe runs TE's kernels: stochastic
rounding draws from the ``sr_rng`` Flax RNG stream the caller passes to ``apply``
(``rngs={"sr_rng": key}``) and the Hadamard transform uses TE's one fixed sign vector, so
the bits are not the native engine's (which draws both from the layer's ``[seed, step]``)
and a TE run does not resume a native one bit for bit.

Tested against a stand-in module; it has not run against a real TE install.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from typing import Any

from dualprec.errors import UnsupportedPolicyError
from dualprec.policy import FP8Recipe, Policy
from dualprec.te_recipes import TE_JAX_SINCE, te_recipe_args, te_refusal

__all__ = ["FP8_COLLECTION", "available", "te_recipe", "supports", "autocast", "dot_general_cls", "recipe_kwargs"]

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
    (formats as TE ``Format`` member names): `dualprec.te_recipes.te_recipe_args`, the table
    the torch adapter uses too.

    Raises:
        UnsupportedPolicyError: An option TE has no equivalent for (row-wise recipes, an MX
            rounding other than rceil).
    """
    return te_recipe_args(recipe)


#: the NVFP4 switches TE-JAX reads from the recipe (its NVFP4 config's attributes)
_NVFP4_SWITCHES = {"disable_stochastic_rounding": ("DISABLE_STOCHASTIC_ROUNDING", "sr=false"),
                   "disable_rht": ("DISABLE_RHT", "rht=false"),
                   "disable_2d_quantization": ("DISABLE_2D_QUANTIZATION", "wblocks=1x16")}


def _check_te_jax_runs(recipe: FP8Recipe, obj, name: str, kwargs: dict) -> None:
    """Refuse a recipe TE-JAX does not run, or runs without one of the policy's options.

    TE-JAX runs four of TE's six recipes (not Float8BlockScaling, not CustomRecipe), each from
    some release on (`dualprec.te_recipes.TE_JAX_SINCE`); its
    ``quantize.helper.get_quantize_config_class`` (TE >= 2.8; ``_get_scaling_mode`` before)
    raises for a recipe it does not run.  A TE-JAX whose NVFP4 config
    does not read a ``disable_*`` switch would ignore the policy's option: refused as well.
    """
    since = f"TE-JAX runs it from {TE_JAX_SINCE[name]}"
    try:
        helper = importlib.import_module("transformer_engine.jax.quantize.helper")
    except ImportError:
        helper = None
    # get_quantize_config_class (TE >= 2.8); _get_scaling_mode before it; neither: DelayedScaling only
    probe = getattr(helper, "get_quantize_config_class", None) or getattr(helper, "_get_scaling_mode", None)
    if probe is None:
        if name != "DelayedScaling":
            raise UnsupportedPolicyError(f"fp8={recipe.scaling}: this Transformer Engine for JAX runs "
                                         f"DelayedScaling only, not {name} ({since}); upgrade TE or use "
                                         "engine=native")
        return
    try:
        config = probe(obj)
    except (ValueError, TypeError, AssertionError):
        raise UnsupportedPolicyError(f"fp8={recipe.scaling}: this Transformer Engine for JAX does not run "
                                     f"{name} ({since}); upgrade TE or use engine=native") from None
    if name != "NVFP4BlockScaling":
        return
    for field, (attr, option) in _NVFP4_SWITCHES.items():
        if kwargs[field] and not hasattr(config, attr):
            raise UnsupportedPolicyError(f"fp8=nvfp4({option}): this Transformer Engine for JAX ignores "
                                         f"NVFP4BlockScaling's {field} (TE-JAX reads it from 2.9); "
                                         "upgrade TE or use engine=native")


def te_recipe(recipe: FP8Recipe):
    """The ``transformer_engine.common.recipe`` object for ``recipe``, once TE-JAX is known
    to run it with every option of the policy (else `UnsupportedPolicyError`)."""
    _te()
    module = importlib.import_module("transformer_engine.common.recipe")
    name, kwargs = recipe_kwargs(recipe)
    cls = getattr(module, name, None)
    if cls is None:
        raise UnsupportedPolicyError(f"fp8={recipe.scaling}: this Transformer Engine has no {name} "
                                     f"(TE-JAX runs it from {TE_JAX_SINCE[name]}); upgrade TE or use engine=native")
    args = dict(kwargs)
    if "fp8_format" in args:
        args["fp8_format"] = getattr(module.Format, args["fp8_format"])
    obj = cls(**args)
    _check_te_jax_runs(recipe, obj, name, kwargs)
    return obj


def supports(recipe: FP8Recipe) -> bool:
    """Whether the installed TE-JAX carries out ``recipe`` as the policy defines it (for
    ``engine=auto``: otherwise the native engine runs it)."""
    if te_refusal(recipe) is not None or not available():
        return False
    try:
        te_recipe(recipe)
    except UnsupportedPolicyError:
        return False
    return True


def check_apply_rngs(policy: Policy, kwargs: dict) -> None:
    """TE-JAX's NVFP4 stochastic rounding draws its bits from the ``sr_rng`` Flax RNG stream
    of the ``apply`` call: refuse, naming the fix, an apply under such a recipe without it
    (Flax would fail deep inside TE's layer instead)."""
    needs = any(q.fp8 is not None and q.fp8.scaling == "nvfp4" and q.fp8.sr for _, q in policy.policies())
    rngs = kwargs.get("rngs")
    if needs and not (isinstance(rngs, dict) and "sr_rng" in rngs):
        raise UnsupportedPolicyError('fp8=nvfp4(sr=true) on Transformer Engine for JAX: TE draws the stochastic-'
                                     'rounding bits from the "sr_rng" RNG stream; pass apply(..., rngs={"sr_rng": '
                                     "key}), or use nvfp4(sr=false) or engine=native")


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
