"""The preset table: every named policy users already spell, as data.

One row per distinct policy.  The first name of a row is its canonical name; the other names
are aliases with the same meaning.  Where two libraries use one spelling for different
things, the table says which meaning wins (Fabric's "bf16" is bf16-mixed, not jmp's
all-bfloat16), and `dualprec explain` shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .policy import FP8Recipe, LossScaleConfig, Policy, Quantization

__all__ = ["Preset", "PRESET_TABLE", "presets", "preset_names", "lookup_preset", "preset_name_of"]


@dataclass(frozen=True)
class Preset:
    """One named policy of the preset table.

    Attributes:
        name: The canonical preset name ("bf16-mixed", "nf4-dq", ...).
        policy: The Policy it names.
        source: The library whose name it is ("Lightning Fabric", "bitsandbytes", "Keras", ...).
        description: One line on what it does.
        aliases: Other names `Policy.parse` takes for it.
    """

    name: str
    policy: Policy
    source: str
    description: str
    aliases: tuple[str, ...] = ()


def _row(name: str, source: str, description: str, aliases: tuple[str, ...] = (), **fields: Any) -> Preset:
    return Preset(name, Policy(**fields), source, description, tuple(aliases))


_DYNAMIC = LossScaleConfig("dynamic")
# Keras 3 LossScaleOptimizer defaults, which mixed_float16 implies in model.compile().
_KERAS_DYNAMIC = LossScaleConfig("dynamic", init_scale=2.0**15, growth_interval=1000)
_TE = FP8Recipe("delayed", engine="transformer-engine")

PRESET_TABLE: tuple[Preset, ...] = (
    # Lightning Fabric precision strings; Fabric's convert_output returns the default dtype
    # (float32), so every Fabric policy outputs float32.
    _row("32-true", "Lightning Fabric", "float32 everywhere", ("32", "float32", "f32", "full", "fp32"),
         param_dtype="float32"),
    _row("64-true", "Lightning Fabric", "float64 params and compute, float32 outputs", ("64",),
         param_dtype="float64", output_dtype="float32"),
    _row("16-true", "Lightning Fabric", "float16 params and compute, no loss scaling, float32 outputs", (),
         param_dtype="float16", output_dtype="float32"),
    _row("bf16-true", "Lightning Fabric", "bfloat16 params and compute, float32 outputs", (),
         param_dtype="bfloat16", output_dtype="float32"),
    _row("16-mixed", "Lightning Fabric", "float32 params, float16 autocast, dynamic loss scaling", ("16",),
         param_dtype="float32", compute_dtype="float16", output_dtype="float32", loss_scale=_DYNAMIC),
    _row("bf16-mixed", "Lightning Fabric", "float32 params, bfloat16 autocast", ("bf16",),
         param_dtype="float32", compute_dtype="bfloat16", output_dtype="float32"),
    _row("transformer-engine", "Lightning Fabric", "bfloat16 weights, FP8 delayed scaling via Transformer Engine",
         (), param_dtype="bfloat16", output_dtype="float32", fp8=_TE),
    _row("transformer-engine-float16", "Lightning Fabric",
         "float16 weights, FP8 delayed scaling via Transformer Engine", (),
         param_dtype="float16", output_dtype="float32", fp8=_TE),
    # bitsandbytes modes (Fabric's BitsandbytesPrecision).  Fabric picks the 4-bit compute
    # dtype from the device; the spec fixes bfloat16 and `check()` offers float16 where a
    # device lacks bfloat16.
    _row("nf4", "bitsandbytes", "NF4 weights (blocks of 64), bfloat16 compute", (),
         param_dtype="bfloat16", output_dtype="float32", quantization=Quantization("nf4")),
    _row("nf4-dq", "bitsandbytes", "NF4 weights with double-quantized absmax, bfloat16 compute", (),
         param_dtype="bfloat16", output_dtype="float32", quantization=Quantization("nf4-dq")),
    _row("fp4", "bitsandbytes", "FP4 weights (blocks of 64), bfloat16 compute", (),
         param_dtype="bfloat16", output_dtype="float32", quantization=Quantization("fp4")),
    _row("fp4-dq", "bitsandbytes", "FP4 weights with double-quantized absmax, bfloat16 compute", (),
         param_dtype="bfloat16", output_dtype="float32", quantization=Quantization("fp4-dq")),
    _row("int8", "bitsandbytes", "LLM.int8 inference weights (outlier threshold 6.0), float16 compute", (),
         param_dtype="float16", output_dtype="float32", quantization=Quantization("int8")),
    _row("int8-training", "bitsandbytes", "LLM.int8 with trainable float16 weights (threshold 6.0)", (),
         param_dtype="float16", output_dtype="float32", quantization=Quantization("int8-training")),
    # jmp / Keras names whose meaning differs from every Fabric string (outputs stay in the
    # compute dtype there).
    _row("float64", "jmp / Keras", "float64 everywhere (JAX needs jax_enable_x64)", ("f64",),
         param_dtype="float64"),
    _row("bfloat16", "jmp / Keras", "bfloat16 everywhere, outputs included", (), param_dtype="bfloat16"),
    _row("float16", "jmp / Keras", "float16 everywhere, outputs included; jmp's 'half' off-TPU",
         ("f16", "half"), param_dtype="float16"),
    _row("mixed_bfloat16", "Keras", "float32 variables, bfloat16 compute and outputs", (),
         param_dtype="float32", compute_dtype="bfloat16"),
    _row("mixed_float16", "Keras",
         "float32 variables, float16 compute and outputs, Keras' LossScaleOptimizer (2**15, every 1000)", (),
         param_dtype="float32", compute_dtype="float16", loss_scale=_KERAS_DYNAMIC),
)

# Spellings that name no single policy: the message explains the choice.
AMBIGUOUS = {
    "fp16": "fp16 is ambiguous: 16-mixed (float32 params, float16 autocast, loss scaling; what "
            "HF's fp16=True does) or float16 (everything float16)?",
    "mixed": "mixed is ambiguous: bf16-mixed or 16-mixed?",
    "true": "true is ambiguous: 32-true, bf16-true or 16-true?",
}


@lru_cache(maxsize=None)
def _index() -> tuple[dict[str, Preset], dict[Policy, str]]:
    by_name: dict[str, Preset] = {}
    by_policy: dict[Policy, str] = {}
    for row in PRESET_TABLE:
        for n in (row.name,) + row.aliases:
            assert n not in by_name, f"preset name {n!r} appears twice"
            by_name[n] = row
        assert row.policy not in by_policy, f"presets {row.name} and {by_policy.get(row.policy)} are equal"
        by_policy[row.policy] = row.name
    return by_name, by_policy


def presets() -> dict[str, Policy]:
    """The named policies.

    Returns:
        Canonical preset name to Policy, in table order (aliases not included).
    """
    return {row.name: row.policy for row in PRESET_TABLE}


def preset_names(include_aliases: bool = True) -> list[str]:
    """The preset names `Policy.parse` takes.

    Args:
        include_aliases: Include the aliases after each canonical name.

    Returns:
        The names, in table order.
    """
    return list(_index()[0]) if include_aliases else [row.name for row in PRESET_TABLE]


def lookup_preset(name: str) -> Preset | None:
    """The preset row of a name or alias.

    Args:
        name: A canonical preset name or alias, spelled exactly.

    Returns:
        The Preset, or None when no preset has that name.
    """
    return _index()[0].get(name)


def preset_name_of(policy: Policy) -> str | None:
    """The preset a policy equals.

    Args:
        policy: The policy.

    Returns:
        The canonical preset name, or None when the policy equals no preset.
    """
    return _index()[1].get(policy)
