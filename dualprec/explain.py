"""What each backend will do under a policy, per op class: the text behind `dualprec explain`.

The spec says what a policy means; how each backend carries it out comes from what the
backend itself registered (`dualprec.registry`) when its package was imported: an
unregistered path reads "not available in this backend", and a backend not imported in this
process reads `registry.not_loaded` (explain never imports a backend)."""

from __future__ import annotations

from typing import Any

from .optable import render_table, table_rows
from .policy import FP8Recipe, Policy
from .presets import lookup_preset, preset_name_of
from .registry import REFUSED, describe, loaded, not_loaded, refusal

__all__ = ["explain", "op_dtypes"]


def op_dtypes(p: Policy) -> dict[str, str]:
    """Dtype of each op class under the op policy (torch's CUDA autocast table, docs/op-table.md)."""
    c = p.compute_dtype
    wide = "float64" if "float64" in (c, p.param_dtype) else "float32"
    matmul = (f"inputs, weight and bias cast to {c}; products accumulated in float32, rounded once to {c}"
              if c in ("bfloat16", "float16") else f"{c} throughout")
    other = (f"follow type promotion: {c} where all inputs are {c}, {p.param_dtype} where a "
             f"{p.param_dtype} tensor (a residual stream, a parameter) joins in" if p.is_mixed
             else f"{c}")
    return {"matmul-like (linear, matmul, bmm, conv, einsum, attention)": matmul,
            "normalization / softmax / loss": (f"{wide}: the op table's float32 list (exp, log, pow, rsqrt, softmax, "
                                               f"layer/rms/group norm, sum, cumsum, losses); mean, var, std, "
                                               f"batch_norm are on no list and stay {c}" if p.is_mixed else
                                               f"{wide} (upcast inputs, output cast back where the op policy says)"),
            "everything else (elementwise, residuals)": other}


def _params(p: Policy) -> str:
    text = f"stored in {p.param_dtype}"
    if p.master_weights:
        text += "; float32 master copies kept for the optimizer"
    return text


def _optimizer(p: Policy) -> str:
    dtype = "float32" if p.master_weights else p.param_dtype
    text = f"gradients and optimizer state in {dtype}"
    if p.master_weights:
        text += f" (master weights), cast back to {p.param_dtype} after each step"
    return text


def _loss_scale(p: Policy) -> str:
    ls = p.loss_scale
    if ls.kind == "none":
        return "none"
    if ls.kind == "static":
        return f"static: loss x {ls.init_scale:g}, gradients x fp32(1/{ls.init_scale:g}); non-finite steps skipped"
    clamp = ""
    if ls.min_scale is not None or ls.max_scale is not None:
        clamp = f", clamped to [{ls.min_scale if ls.min_scale is not None else 0:g}, " \
                f"{ls.max_scale if ls.max_scale is not None else float('inf'):g}]"
    return (f"dynamic: start {ls.init_scale:g}, x{ls.growth_factor:g} after {ls.growth_interval} finite steps, "
            f"x{ls.backoff_factor:g} and skip the step on inf/NaN{clamp}")


def _quant(p: Policy, backend: str) -> str:
    q = p.quantization
    if q is None:
        return "none"
    skip = f"; skipped: {', '.join(q.skip)}" if q.skip else ""
    if q.is_4bit:
        what = (f"{q.quant_type.upper()} weights in blocks of {q.blocksize}, fp32 absmax"
                + (", absmax double-quantized (8-bit, blocks of 256)" if q.double_quant else ""))
    else:
        what = (f"LLM.int8 weights (per-row absmax), outlier threshold {q.threshold:g}"
                + (", fp16 weights trainable" if q.mode == "int8-training" else ", inference only"))
    return f"{what}; {describe(backend, f'quantization.{q.mode}', p)}{skip}"


def _fp8(p: Policy, backend: str) -> str:
    f = p.fp8
    if f is None:
        return "none"
    fmt = "E4M3 forward, E5M2 gradients" if f.format == "hybrid" else "E4M3 everywhere"
    if f.scaling == "delayed":
        recipe = f"delayed scaling (amax history {f.history_len}, {f.amax_algo}, margin {f.margin}), {fmt}"
    elif f.scaling == "current":
        recipe = f"current scaling (each tensor's own amax), {fmt}"
    elif f.block_scaled:
        return _block_fp8(f)
    if f.engine == "auto":
        engine = (f"engine auto: {describe(backend, 'fp8.transformer-engine', p)} on a GPU with Transformer "
                  f"Engine, else {describe(backend, 'fp8.native', p)}")
    else:
        engine = describe(backend, f"fp8.{f.engine}", p)
    return f"{recipe}; {engine}"


def _block_fp8(f: FP8Recipe) -> str:
    if f.scaling == "mxfp8":
        what = (f"MXFP8: E8M0 scales over blocks of 32 along the reduction axis, {f.rounding} scale rounding, "
                + ("E4M3 codes" if f.format == "e4m3" else "E4M3 forward, E5M2 gradients"))
    elif f.scaling == "nvfp4":
        what = (f"NVFP4: E2M1 codes, E4M3 scales over blocks of 16 and a float32 tensor scale; weights in "
                f"{f.weight_blocks} blocks; stochastic rounding of gradients {'on' if f.sr else 'off'}; "
                f"random Hadamard transform of the weight-gradient operands {'on' if f.rht else 'off'}")
    else:
        what = ("torchao row-wise FP8: one power-of-two scale per row along the reduction axis, E4M3"
                + (", weight gradient in high precision" if f.scaling == "rowwise_with_gw_hp" else ""))
    return (f"{what}; emulated exactly (dequantized operands, float32 GEMMs): torch BlockScaledLinear, "
            "JAX linen Dense through Precision (nnx: not yet), state [seed, step] per layer")


def _nonfinite(p: Policy, backend: str) -> str:
    rule = {"apply": "applied as computed (inf/NaN reach the weights, as in torch without a GradScaler)",
            "skip": "skipped (parameters and optimizer state unchanged)",
            "raise": "skipped, then NonFiniteGradientError naming the first such parameter"}[p.nonfinite_rule]
    return f"steps with inf/NaN gradients: {rule}; {describe(backend, 'nonfinite', p)}"


def _reduce(p: Policy, backend: str) -> str:
    return f"{p.reduce_dtype} (sharded training): {describe(backend, 'reduce', p)}"


_LINES = ("mechanism", "params", *op_dtypes(Policy.parse("32-true")), "outputs", "optimizer", "gradient reduction",
          "loss scaling", "non-finite steps", "quantization", "fp8")


def explain(p: Policy) -> dict:
    """What the torch and JAX backends do under a policy (``dualprec explain``).

    Args:
        p: The policy.

    Returns:
        A JSON-ready dict: ``policy`` (its canonical string), ``preset`` (name, source,
        description, aliases; None when it is no preset), ``dtypes``, ``overrides``,
        ``op_table`` and ``op_table_text`` (the op rules under the policy) and
        ``backends``: per backend, one line per part of a step (mechanism, params, each op
        class, outputs, optimizer, gradient reduction, loss scaling, non-finite steps,
        quantization, fp8) from what the backend registered, or the refusal its Precision
        constructor raises; for a backend whose package was not imported in this process,
        every line is `dualprec.registry.not_loaded` (import ``dualprec_torch`` /
        ``dualprec_jax`` first: explain imports no backend).
    """
    preset = lookup_preset(preset_name_of(p) or "")
    backends: dict[str, dict[str, str]] = {}
    out: dict[str, Any] = {
        "policy": str(p),
        "preset": None if preset is None else {"name": preset.name, "source": preset.source,
                                               "description": preset.description, "aliases": list(preset.aliases)},
        "dtypes": {"params": p.param_dtype, "compute": p.compute_dtype, "output": p.output_dtype,
                   "reduce": p.reduce_dtype},
        "backends": backends,
        "overrides": [{"pattern": pat, "policy": str(sub)} for pat, sub in p.overrides],
        "op_table": table_rows(p),
        "op_table_text": render_table(p),
    }
    for backend in ("torch", "jax"):
        if not loaded(backend):
            backends[backend] = dict.fromkeys(_LINES, not_loaded(backend))
            continue
        reason = refusal(backend, p)
        if reason is not None:  # what the constructor says: no path to describe
            backends[backend] = {
                key: (f"{REFUSED}: UnsupportedPolicyError: {reason}" if key == "mechanism" else f"{REFUSED} (see mechanism)")
                for key in _LINES}
            continue
        backends[backend] = {
            "mechanism": describe(backend, "mechanism", p),
            "params": _params(p),
            **op_dtypes(p),
            "outputs": f"cast to {p.output_dtype} (integer and complex tensors untouched)",
            "optimizer": _optimizer(p),
            "gradient reduction": _reduce(p, backend),
            "loss scaling": _loss_scale(p),
            "non-finite steps": _nonfinite(p, backend),
            "quantization": _quant(p, backend),
            "fp8": _fp8(p, backend),
        }
    return out
