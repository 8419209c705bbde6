"""What people type for a precision in other libraries, and the dualprec policy they mean.

Edit distance alone suggests the wrong thing for these ("fp16-mixed" is one letter from
"bf16-mixed" but means 16-mixed; "tf32" is one letter from "f32" but is a matmul setting).
The table is consulted before the nearest-spelling suggestion when a policy name is unknown.
Names that are already presets or aliases (bf16, fp32, half, mixed_float16...) never get
here: they parse.
"""

from __future__ import annotations

__all__ = ["SPELLINGS", "suggestion"]

_MIXED16 = '"16-mixed" (float32 params, float16 autocast, dynamic loss scaling)'
_MIXED_BF16 = '"bf16-mixed" (float32 params, bfloat16 autocast)'
_AMP = ('"16-mixed" (torch.amp with GradScaler: float16 autocast, loss scaling) or '
        '"bf16-mixed" (bfloat16 autocast, no scaler)')
_FP8 = ('"transformer-engine" (Transformer Engine FP8 with bfloat16 weights) or '
        '"bf16-mixed,fp8=delayed" (dualprec\'s own FP8 matmuls)')

#: lower-case spelling -> what to write instead (with why, when it is not obvious)
SPELLINGS: dict[str, str] = {
    # Lightning 1.x / HF Trainer / Accelerate spellings of float16 autocast
    "fp16-mixed": _MIXED16, "fp16_mixed": _MIXED16, "fp16mixed": _MIXED16, "16_mixed": _MIXED16,
    "float16-mixed": _MIXED16, "float16_mixed": _MIXED16, "mixed-float16": _MIXED16,
    "mixed_fp16": _MIXED16, "mixed-fp16": _MIXED16, "16-amp": _MIXED16, "fp16-amp": _MIXED16,
    "native": f"{_MIXED16} (Lightning 1.x's native amp_backend)",
    "o1": f"{_MIXED16} (apex O1)",
    "o2": '"16-true,master=true" (apex O2: float16 model, float32 master weights)',
    "o3": '"16-true" (apex O3: everything float16)',
    "apex": f"{_MIXED16} (apex O1) or \"16-true,master=true\" (apex O2)",
    # bfloat16 autocast
    "bf16_mixed": _MIXED_BF16, "bf16mixed": _MIXED_BF16, "bfloat16-mixed": _MIXED_BF16,
    "bfloat16_mixed": _MIXED_BF16, "mixed-bf16": _MIXED_BF16, "mixed_bf16": _MIXED_BF16,
    "bf16-amp": _MIXED_BF16,
    # torch.amp / autocast by name
    "amp": _AMP, "autocast": _AMP, "torch.amp": _AMP, "cuda-amp": _AMP,
    # "true" policies spelled with a dtype name
    "fp16-true": '"16-true" (float16 params and compute)', "fp16_true": '"16-true" (float16 params and compute)',
    "float16-true": '"16-true" (float16 params and compute)',
    "bf16_true": '"bf16-true" (bfloat16 params and compute)', "bfloat16-true": '"bf16-true" (bfloat16 params and compute)',
    "fp32-true": '"32-true"', "float32-true": '"32-true"', "fp32_true": '"32-true"',
    "fp64": '"64-true" (Fabric: float32 outputs) or "float64" (everything float64)',
    "double": '"64-true" (Fabric: float32 outputs) or "float64" (everything float64)',
    # Accelerate's mixed_precision="no"
    "no": '"32-true" (Accelerate\'s mixed_precision=no)', "none": '"32-true"',
    "fp32-mixed": '"32-true" (float32 has nothing to mix)',
    # TF32 is a matmul setting, not a storage dtype
    "tf32": ('"32-true" (TF32 is a matmul mode for float32 tensors: '
             'torch.backends.cuda.matmul.allow_tf32 / jax_default_matmul_precision)'),
    "tf32-true": '"32-true" (TF32 is a matmul mode, set in the framework)',
    # FP8 (Accelerate's "fp8", Transformer Engine recipes)
    "fp8": _FP8, "fp8-mixed": _FP8, "fp8_mixed": _FP8, "float8": _FP8, "e4m3": _FP8, "hybrid": _FP8,
    "te": '"transformer-engine"', "transformer_engine": '"transformer-engine"', "fp8-delayed": _FP8,
    # bitsandbytes / HF quantization flags
    "4bit": '"nf4" (load_in_4bit with bnb_4bit_quant_type="nf4"; "fp4" for the other type)',
    "load_in_4bit": '"nf4" (or "nf4-dq" for bnb_4bit_use_double_quant=True)',
    "int4": '"nf4" or "fp4" (bitsandbytes 4-bit; dualprec has no plain int4)',
    "qlora": '"nf4-dq" (QLoRA: NF4 with double quantization, bfloat16 compute)',
    "8bit": '"int8" (load_in_8bit, LLM.int8) or "int8-training"',
    "load_in_8bit": '"int8" (LLM.int8)', "llm.int8": '"int8"', "llm-int8": '"int8"',
    # Keras / jmp spellings close to the real ones
    "mixed_bf16_policy": '"mixed_bfloat16"',
}


def suggestion(name: str) -> str:
    """' (did you mean X?)' for a spelling in the table, or '' when it is not there."""
    hint = SPELLINGS.get(name.strip().lower())
    return f" (did you mean {hint}?)" if hint else ""
