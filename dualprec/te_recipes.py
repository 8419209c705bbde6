"""Which Transformer Engine recipe carries out a dualprec FP8 recipe, in both backends.

One table for ``dualprec_torch.te`` and ``dualprec_jax.te``: a dualprec `FP8Recipe` maps to
one class of ``transformer_engine.common.recipe`` (TE 2.x) and its keyword arguments, or is
refused with an `UnsupportedPolicyError` that names the option TE has no equivalent for and
the fix (``engine=native``).  Nothing here imports TE; formats are given as ``Format``
member names and the backends look them up.

=========================================  ===============================================
dualprec                                   Transformer Engine 2.x
=========================================  ===============================================
``delayed(history_len, margin, amax_algo,  ``DelayedScaling(fp8_format, margin,
format)``                                  amax_history_len, amax_compute_algo)``
``current(format)``                        ``Float8CurrentScaling(fp8_format)``
``mxfp8(rounding=rceil, format)``          ``MXFP8BlockScaling(fp8_format)``
``mxfp8(rounding=floor|ceil|even)``        refused: TE rounds MX scales up (RCEIL) only
``nvfp4(sr, rht, wblocks)``                ``NVFP4BlockScaling(disable_stochastic_rounding=
                                           not sr, disable_rht=not rht,
                                           disable_2d_quantization=wblocks == "1x16")``
``rowwise``, ``rowwise_with_gw_hp``        refused: torchao's per-row scales have no TE
                                           recipe (``Float8BlockScaling`` is 1x128 / 128x128
                                           blocks, another recipe)
=========================================  ===============================================

The NVFP4 switches are always passed, defaults included: TE's dataclass takes their defaults
from environment variables (``NVTE_NVFP4_DISABLE_RHT``, ...), which must not override the
policy.
"""

from __future__ import annotations

from .errors import UnsupportedPolicyError
from .policy import FP8Recipe

__all__ = ["te_recipe_args", "te_refusal", "te_runs_on", "fp8_token", "TE_CLASSES", "TE_MIN_CAPABILITY", "TE_TORCH_SINCE", "TE_JAX_SINCE"]

#: dualprec scaling -> the TE recipe class that carries it out
TE_CLASSES = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling",
              "mxfp8": "MXFP8BlockScaling", "nvfp4": "NVFP4BlockScaling"}

#: the compute capability TE runs each recipe on (MXFP8 and NVFP4: Blackwell)
TE_MIN_CAPABILITY = {"DelayedScaling": (8, 9), "Float8CurrentScaling": (8, 9),
                     "MXFP8BlockScaling": (10, 0), "NVFP4BlockScaling": (10, 0)}

#: the first TE release whose PyTorch API has each class (from TE's release tags)
TE_TORCH_SINCE = {"DelayedScaling": "1.0", "Float8CurrentScaling": "2.2", "MXFP8BlockScaling": "2.0",
                  "NVFP4BlockScaling": "2.8"}

#: the first TE release whose JAX API runs each class (TE-JAX runs four of TE's six recipes:
#: not Float8BlockScaling, not CustomRecipe)
TE_JAX_SINCE = {"DelayedScaling": "1.0", "Float8CurrentScaling": "2.4", "MXFP8BlockScaling": "2.3",
                "NVFP4BlockScaling": "2.9"}


def te_refusal(recipe: FP8Recipe) -> str | None:
    """Why Transformer Engine cannot carry out ``recipe`` as the policy defines it.

    Args:
        recipe: The FP8 recipe.

    Returns:
        A one-line message naming the option TE lacks and the fix (``engine=native``), or
        None when TE has the recipe with every option.
    """
    s = recipe.scaling
    if s in ("rowwise", "rowwise_with_gw_hp"):
        return (f"fp8={s}: torchao's row-wise recipe (one power-of-two scale per row) has no Transformer "
                "Engine recipe (TE's Float8BlockScaling scales 1x128 and 128x128 blocks: another recipe); "
                f"use fp8={s}(engine=native)")
    if s == "mxfp8" and recipe.rounding != "rceil":
        return (f"fp8=mxfp8(rounding={recipe.rounding}): Transformer Engine's MXFP8BlockScaling rounds block "
                "scales up (RCEIL) and has no option for another rounding; use "
                f"fp8=mxfp8(rounding={recipe.rounding},engine=native), or rounding=rceil on TE")
    if s not in TE_CLASSES:  # pragma: no cover - every scaling is handled above
        return f"fp8={s}: no Transformer Engine recipe; use engine=native"
    return None


def te_recipe_args(recipe: FP8Recipe) -> tuple[str, dict]:
    """The TE recipe class name and its keyword arguments for ``recipe``.

    Args:
        recipe: The FP8 recipe.

    Returns:
        ``(class name in transformer_engine.common.recipe, keyword arguments)``, formats as TE
        ``Format`` member names ("E4M3", "HYBRID").

    Raises:
        UnsupportedPolicyError: The recipe, or one of its options, has no TE equivalent.
    """
    why = te_refusal(recipe)
    if why is not None:
        raise UnsupportedPolicyError(why)
    s = recipe.scaling
    if s == "nvfp4":
        return "NVFP4BlockScaling", {"disable_stochastic_rounding": not recipe.sr, "disable_rht": not recipe.rht,
                                     "disable_2d_quantization": recipe.weight_blocks == "1x16"}
    fmt = {"hybrid": "HYBRID", "e4m3": "E4M3"}[str(recipe.format)]
    if s == "delayed":
        return "DelayedScaling", {"fp8_format": fmt, "margin": int(recipe.margin),
                                  "amax_history_len": int(recipe.history_len),
                                  "amax_compute_algo": recipe.amax_algo}
    return TE_CLASSES[s], {"fp8_format": fmt}


def fp8_token(recipe: FP8Recipe) -> str:
    """The recipe as the policy grammar writes it (``nvfp4(sr=true,rht=true,wblocks=16x16)``)."""
    from .grammar import _format_value

    return _format_value(recipe)


def te_runs_on(recipe: FP8Recipe, capability: tuple[int, int] | None) -> bool:
    """Whether TE runs ``recipe`` as the policy defines it on a GPU of this compute capability.

    Args:
        recipe: The FP8 recipe.
        capability: The GPU's compute capability, e.g. ``(10, 0)``; None: no CUDA GPU.

    Returns:
        False for a refused recipe (`te_refusal`), without a GPU, or below the capability TE
        needs for the recipe's class (`TE_MIN_CAPABILITY`).
    """
    if capability is None or te_refusal(recipe) is not None:
        return False
    return tuple(capability) >= TE_MIN_CAPABILITY[TE_CLASSES[recipe.scaling]]
