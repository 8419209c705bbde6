"""LLM.int8: per-output-row absmax weight codes and the matmul with outlier decomposition."""

from __future__ import annotations

import numpy as np

_INV127 = np.float32(1.0 / 127.0)
_INV127SQ = np.float32(1.0 / (127.0 * 127.0))


def _rowwise_codes(a16: np.ndarray):
    """int8 codes round(a * 127 / absmax_row) (half to even) and float32 absmax per row."""
    a32 = a16.astype(np.float32)
    absmax = np.abs(a32).max(axis=1)
    with np.errstate(divide="ignore"):
        # bitsandbytes writes 127.0 / absmax, which torch evaluates as reciprocal(absmax) * 127
        # (Tensor.__rtruediv__): one more rounding than a division, and a different code for
        # some weights.
        factor = (np.float32(1.0) / absmax) * np.float32(127.0)
    # An all-zero row has no scale; its codes are 0 (bitsandbytes would compute 0 * inf).
    factor = np.where(absmax == 0, np.float32(0), factor).astype(np.float32)
    return np.rint(a32 * factor[:, None]).astype(np.int8), absmax.astype(np.float32)


def _check_2d(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be a floating array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {a.shape}")
    return a


def int8_quantize_weight(w):
    """(codes int8 [out, in], scb float32 [out]) from the float16 rounding of `w`.

    NaN or inf in `w` raise ValueError (they would poison their row).
    """
    w16 = _check_2d("w", w).astype(np.float16)
    if not np.isfinite(w16).all():
        raise ValueError("w contains NaN or inf (after rounding to float16)")
    return _rowwise_codes(w16)


def int8_dequantize_weight(codes, scb) -> np.ndarray:
    """float32 weight codes * scb / 127."""
    codes, scb = np.asarray(codes), np.asarray(scb, np.float32)
    if codes.dtype != np.int8:
        raise ValueError(f"codes must be int8, got {codes.dtype}")
    if codes.ndim != 2 or scb.shape != (codes.shape[0],):
        raise ValueError(f"scb must have shape ({codes.shape[0]},) to match codes {codes.shape}, got {scb.shape}")
    return codes.astype(np.float32) * (scb[:, None] * _INV127)


def int8_matmul(x, codes, scb, threshold: float = 6.0) -> np.ndarray:
    """x @ W.T in LLM.int8 form, float32 result of shape [..., out].

    `x` is rounded to float16. Columns of x holding any |x| >= threshold (bitsandbytes'
    comparison) are multiplied in float32 against the dequantized weight columns; the rest
    is quantized per row of x (absmax ignoring the outlier entries) and multiplied
    int8 x int8 -> int32 exactly, then scaled by absmax_x * scb / 127**2.
    threshold <= 0 disables the decomposition.
    """
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise ValueError(f"x must be a floating array, got dtype {x.dtype}")
    w_deq = int8_dequantize_weight(codes, scb)
    if x.shape[-1] != w_deq.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but codes has {w_deq.shape[1]} columns")
    lead = x.shape[:-1]
    x16 = x.astype(np.float16).reshape(-1, x.shape[-1])
    outliers = np.abs(x16) >= threshold if threshold > 0 else np.zeros(x16.shape, bool)
    cols = np.flatnonzero(outliers.any(axis=0))
    ca, sca = _rowwise_codes(np.where(outliers, np.float16(0), x16))
    ca[:, cols] = 0
    acc = ca.astype(np.int64) @ np.asarray(codes).astype(np.int64).T
    out = acc.astype(np.int32).astype(np.float32) * (sca[:, None] * np.asarray(scb, np.float32)[None, :]) * _INV127SQ
    if cols.size:
        out = out + x16[:, cols].astype(np.float32) @ w_deq[:, cols].T
    return out.astype(np.float32).reshape(*lead, w_deq.shape[0])
