"""Bytes per parameter of weights, gradients and optimizer state, per policy and backend:
measured on built workloads, next to what the dtypes say they should be.

Torch: the storage sizes of parameter, gradient and optimizer-state tensors (any device),
and on CUDA also the allocator's view (`torch.cuda.memory_allocated` deltas across the
phases of a step).  JAX: the nbytes of the live arrays that make up each part, and the
change in `jax.live_arrays()` over building the case as a cross-check.
"""

from __future__ import annotations

from typing import Any

from .harness import Record
from .workloads import POLICIES, MLPConfig, build_jax_case, build_torch_case

__all__ = ["THEORY", "theoretical", "storage_bytes", "measure_torch", "measure_jax", "memory_record"]

# AdamW keeps two moments in the parameter dtype; nf4 stores 4 bits per weight plus one fp32
# absmax per block of 64 and trains nothing of the quantized weights.
THEORY: dict[str, dict[str, float]] = {
    "32-true": {"weights": 4, "grads": 4, "optimizer": 8},
    "bf16-mixed": {"weights": 4, "grads": 4, "optimizer": 8},
    "16-mixed": {"weights": 4, "grads": 4, "optimizer": 8},
    "bf16-true": {"weights": 2, "grads": 2, "optimizer": 4},
    "fp8-current": {"weights": 4, "grads": 4, "optimizer": 8},
    "nf4": {"weights": 0.5 + 4 / 64, "grads": 0, "optimizer": 0},
}
NOTES = {
    "bf16-mixed": "autocast also caches a bf16 copy of each weight during the step (+2, transient)",
    "16-mixed": "autocast also caches a fp16 copy of each weight during the step (+2, transient)",
    "fp8-current": "fp8 copies of weights are made per step (+1, transient)",
    "nf4": "nf4-dq: 0.5 + 1/64 + 4/(64*256) = 0.516; LayerNorms and biases (trainable) are not counted",
}


def theoretical(label: str) -> dict[str, float]:
    t = dict(THEORY[label])
    t["total"] = sum(t.values())
    return t


def storage_bytes(tensors) -> int:
    """Bytes held by torch tensors (each storage once) or JAX/NumPy arrays (nbytes)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "untyped_storage"):
            storage = t.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        else:
            total += int(t.nbytes)
    return total


def _per_param(parts: dict[str, int], n_params: int) -> dict[str, float]:
    out = {k: v / n_params for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def measure_torch(cfg: MLPConfig, label: str, device: str = "cpu", impl: str = "hand") -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        m0 = torch.cuda.memory_allocated()
    case = build_torch_case(cfg, label, device=device, impl=impl)
    if cuda:
        m1 = torch.cuda.memory_allocated()
    case.sync(case.step())          # creates the optimizer state, then frees the gradients
    if cuda:
        m2 = torch.cuda.memory_allocated()
    case.sync(case.forward_backward())  # gradients, kept
    parts = {"weights": storage_bytes(case.weights()), "grads": storage_bytes(case.grads()),
             "optimizer": storage_bytes(case.optimizer_state())}
    out = {"bytes": parts, "bytes_per_param": _per_param(parts, cfg.params), "method": "tensor storage sizes"}
    if cuda:
        m3 = torch.cuda.memory_allocated()
        alloc = {"weights_and_batch": m1 - m0, "optimizer": m2 - m1, "grads": m3 - m2}
        out["allocator_bytes"] = alloc
        out["allocator_bytes_per_param"] = {k: v / cfg.params for k, v in alloc.items()}
        out["method"] += " + torch.cuda.memory_allocated deltas"
        out["peak_memory_bytes"] = case.peak_memory()
    del case
    return out


def _live_bytes() -> int:
    import jax
    return sum(int(a.nbytes) for a in jax.live_arrays())


def measure_jax(cfg: MLPConfig, label: str, impl: str = "hand") -> dict[str, Any]:
    import gc

    gc.collect()
    before = _live_bytes()
    case = build_jax_case(cfg, label, impl=impl)
    case.sync(case.step())
    built = _live_bytes() - before
    case.sync(case.forward_backward())
    parts = {"weights": storage_bytes(case.weights()), "grads": storage_bytes(case.grads()),
             "optimizer": storage_bytes(case.optimizer_state())}
    out = {"bytes": parts, "bytes_per_param": _per_param(parts, cfg.params),
           "method": "nbytes of the live arrays of params / grads / optimizer state",
           "live_arrays_delta_after_step": built, "peak_memory_bytes": case.peak_memory()}
    del case
    return out


def memory_record(cfg: MLPConfig, backend: str, label: str, device: str = "cpu", impl: str = "hand") -> Record:
    from .workloads import policy_row

    measured = measure_torch(cfg, label, device, impl) if backend == "torch" else measure_jax(cfg, label, impl)
    extra = {"memory": measured, "theory_bytes_per_param": theoretical(label)}
    if label in NOTES:
        extra["theory_note"] = NOTES[label]
    return Record(workload=cfg.name, backend=backend, policy=label, impl=impl, mode="memory",
                  policy_spec=policy_row(label).canonical(), device=device if backend == "torch" else None,
                  peak_memory_bytes=measured.get("peak_memory_bytes"), extra=extra)


def theory_markdown() -> str:
    lines = ["| policy | weights | grads | AdamW state | total | note |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in POLICIES:
        t = theoretical(row.label)
        lines.append(f"| {row.label} | {t['weights']:g} | {t['grads']:g} | {t['optimizer']:g} | {t['total']:g} | "
                     f"{NOTES.get(row.label, '')} |")
    return "\n".join(lines)
