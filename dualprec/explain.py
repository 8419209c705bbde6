"""What each backend will do under a policy, per op class: the text behind `dualprec explain`."""

from __future__ import annotations

from .optable import render_table, table_rows
from .policy import Policy
from .presets import lookup_preset, preset_name_of

__all__ = ["explain", "op_dtypes"]


def op_dtypes(p: Policy) -> dict[str, str]:
    """Dtype of each op class under the op policy of DESIGN.md."""
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
        how = ("bitsandbytes Linear4bit replaces nn.Linear" if backend == "torch"
               else "dualprec_jax 4-bit Dense: packed uint8 codes, dequantized to the compute dtype, same bits as bitsandbytes")
    else:
        what = (f"LLM.int8 weights (per-row absmax), outlier threshold {q.threshold:g}"
                + (", fp16 weights trainable" if q.mode == "int8-training" else ", inference only"))
        how = ("bitsandbytes Linear8bitLt replaces nn.Linear" if backend == "torch"
               else "dualprec_jax int8 Dense (int8 x int8 -> int32 with the outlier decomposition)")
    return f"{what}; {how}{skip}"


def _fp8(p: Policy, backend: str) -> str:
    f = p.fp8
    if f is None:
        return "none"
    fmt = "E4M3 forward, E5M2 gradients" if f.format == "hybrid" else "E4M3 everywhere"
    if f.scaling == "delayed":
        recipe = f"delayed scaling (amax history {f.history_len}, {f.amax_algo}, margin {f.margin}), {fmt}"
    else:
        recipe = f"current scaling (each tensor's own amax), {fmt}"
    engines = {"torch": {"transformer-engine": "transformer_engine.pytorch layers under fp8_autocast",
                         "native": "torch._scaled_mm with dualprec's scale state"},
               "jax": {"transformer-engine": "transformer_engine.jax layers",
                       "native": "XLA dot_general on fp8 operands with dualprec's scale state"}}[backend]
    if f.engine == "auto":
        engine = f"engine auto: {engines['transformer-engine']} on a GPU with Transformer Engine, else {engines['native']}"
    else:
        engine = engines[f.engine]
    return f"{recipe}; {engine}"


def _mechanism(p: Policy, backend: str) -> str:
    if backend == "torch":
        if p.is_mixed:
            return (f"torch.autocast(dtype={p.compute_dtype}) around forward and loss: plain on CUDA; on CPU with "
                    "CUDA autocast's op table (AutocastCPU kernels for the listed ops)")
        return f"module converted to {p.param_dtype}; default dtype {p.param_dtype} while building the model"
    text = ("Flax modules intercepted: dot_general with preferred_element_type=float32, fp32 bias, one rounding"
            if p.compute_dtype in ("bfloat16", "float16") else f"Flax modules run in {p.compute_dtype}")
    if p.needs_x64:
        text += "; turns on jax_enable_x64 (JAX computes in 32 bits otherwise)"
    return text


def explain(p: Policy) -> dict:
    """A JSON-ready description of what the torch and JAX backends do under ``p``."""
    preset = lookup_preset(preset_name_of(p) or "")
    out = {
        "policy": str(p),
        "preset": None if preset is None else {"name": preset.name, "source": preset.source,
                                               "description": preset.description, "aliases": list(preset.aliases)},
        "dtypes": {"params": p.param_dtype, "compute": p.compute_dtype, "output": p.output_dtype,
                   "reduce": p.reduce_dtype},
        "backends": {},
        "overrides": [{"pattern": pat, "policy": str(sub)} for pat, sub in p.overrides],
        "op_table": table_rows(p),
        "op_table_text": render_table(p),
    }
    for backend in ("torch", "jax"):
        out["backends"][backend] = {
            "mechanism": _mechanism(p, backend),
            "params": _params(p),
            **op_dtypes(p),
            "outputs": f"cast to {p.output_dtype} (integer and complex tensors untouched)",
            "optimizer": _optimizer(p),
            "gradient reduction": f"{p.reduce_dtype} (sharded training)",
            "loss scaling": _loss_scale(p),
            "quantization": _quant(p, backend),
            "fp8": _fp8(p, backend),
        }
    return out
