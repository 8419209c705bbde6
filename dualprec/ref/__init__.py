"""Reference numerics in NumPy + ml_dtypes: the ground truth both backends are tested against."""

from . import blockscale  # noqa: F401  (row-wise, MXFP8, NVFP4: dualprec.ref.blockscale)
from .casts import FP8_MAX, cast, nan_equal
from .fourbit import QuantState4bit, dequantize_4bit, quantize_4bit
from .fp8 import (
    FP8Meta,
    FP8State,
    dequantize_fp8,
    fp8_current_scale,
    fp8_delayed_init,
    fp8_delayed_update,
    fp8_gemm_qdq,
    quantize_fp8,
)
from .int8 import int8_dequantize_weight, int8_matmul, int8_quantize_weight
from .loss_scale import LossScaleState, all_finite, loss_scale_init, loss_scale_update, unscale

__all__ = [
    "FP8_MAX", "cast", "nan_equal",
    "LossScaleState", "loss_scale_init", "loss_scale_update", "all_finite", "unscale",
    "QuantState4bit", "quantize_4bit", "dequantize_4bit",
    "int8_quantize_weight", "int8_dequantize_weight", "int8_matmul",
    "FP8Meta", "FP8State", "fp8_delayed_init", "fp8_delayed_update", "fp8_current_scale",
    "quantize_fp8", "dequantize_fp8", "fp8_gemm_qdq",
]
