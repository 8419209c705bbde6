"""Step time of the hand-written torch.autocast (+ GradScaler) loop against the same loop
through `dualprec_torch.Precision`, on the 4-block MLP of the H200 reference workload (bench/workloads.py).

`run_gpu_torch()` is the GPU section the device script calls (bf16-mixed and 16-mixed,
eager and torch.compile); every size is a parameter so it also runs on CPU with tiny sizes.
`bench/bench_torch_precision.py` uses the same model and loops for the CPU measurement.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["MLPBlocks", "hand_step", "precision_step", "measure_pair", "measure_pair_stats", "run_gpu_torch"]


class MLPBlocks(nn.Module):
    """``blocks`` residual blocks of LayerNorm -> Linear(d, hidden) -> GELU -> Linear(hidden, d)."""

    def __init__(self, d: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
            for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _build(d, hidden, blocks, device, seed=0):
    torch.manual_seed(seed)
    model = MLPBlocks(d, hidden, blocks).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def hand_step(model, opt, scaler, x, dtype, device_type):
    """What a torch user writes: autocast for forward and loss, GradScaler when float16."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=dtype):
        loss = model(x).pow(2).mean()
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def precision_step(prec, model, opt, x):
    """The same step through dualprec_torch.Precision."""
    opt.zero_grad(set_to_none=True)
    with prec.autocast():
        loss = model(x).pow(2).mean()
    prec.backward(loss)
    prec.step(opt)
    prec.update()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_pair(policy: str, **kwargs) -> tuple[float, float]:
    """(hand-written, Precision) median seconds per step; arguments as `measure_pair_stats`."""
    m = measure_pair_stats(policy, **kwargs)
    return m["hand_s"], m["precision_s"]


def measure_pair_stats(policy: str, *, d, hidden, blocks, tokens, steps, warmup, rounds, device,
                       compile_model=False) -> dict:
    """Seconds per step of the hand-written loop and of Precision, in alternating rounds in
    one process, so drift and neighbours' load hit both alike.

    On CPU the clock is this process's CPU time (time spent descheduled by other processes on
    a shared machine does not count); on CUDA it is wall time between synchronisations.
    Returns the median per-step time of each side, the median of the per-round ratios
    (Precision / hand-written, each round's pair measured back to back) and every round's
    per-step times.
    """
    from dualprec import Policy
    from dualprec_torch import Precision
    from dualprec_torch.casts import torch_dtype

    policy = Policy.parse(policy)
    device_type = torch.device(device).type
    clock = time.perf_counter if device_type == "cuda" else time.process_time
    dtype = torch_dtype(policy.compute_dtype)
    x = torch.randn(tokens, d, device=device)

    model_h, opt_h = _build(d, hidden, blocks, device)
    scaler = torch.amp.GradScaler(device_type) if policy.loss_scale.enabled else None
    prec = Precision(policy, device=device)
    model_p, opt_p = prec.setup(*_build(d, hidden, blocks, device))
    run_h, run_p = (torch.compile(model_h), torch.compile(model_p)) if compile_model else (model_h, model_p)

    def hand():
        hand_step(run_h, opt_h, scaler, x, dtype, device_type)

    def through_precision():
        precision_step(prec, run_p, opt_p, x)

    for _ in range(warmup):
        hand()
        through_precision()
    times = {hand: [], through_precision: []}
    for r in range(rounds):
        order = (hand, through_precision) if r % 2 == 0 else (through_precision, hand)
        for fn in order:
            _sync(device)
            t0 = clock()
            for _ in range(steps):
                fn()
            _sync(device)
            times[fn].append((clock() - t0) / steps)

    def median(v):
        v = sorted(v)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

    ratios = [p / h for p, h in zip(times[through_precision], times[hand])]
    return {"hand_s": median(times[hand]), "precision_s": median(times[through_precision]),
            "ratio": median(ratios), "ratio_min_times": min(times[through_precision]) / min(times[hand]),
            "clock": "process_time" if clock is time.process_time else "wall",
            "hand_rounds_s": times[hand], "precision_rounds_s": times[through_precision]}


def run_gpu_torch(*, d=4096, hidden=16384, blocks=4, tokens=16384, steps=10, warmup=3, rounds=3,
                  policies=("bf16-mixed", "16-mixed"), compile_modes=(False, True), device="cuda") -> dict:
    """TFLOP/s (6 x params x tokens per step) of hand-written vs Precision, per policy and mode.

    Returns {policy: {"eager"|"compiled": {"hand_tflops", "precision_tflops", "ratio",
    "hand_s", "precision_s", ...}}}; ratio = Precision step time / hand-written step time
    (median of per-round ratios); TFLOP/s from the median step times.
    """
    params = blocks * (2 * d + d * hidden + hidden + hidden * d + d)
    flops = 6.0 * params * tokens
    out: dict = {"params": params, "tokens": tokens, "device": str(device)}
    if torch.device(device).type == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
    for policy in policies:
        out[policy] = {}
        for compiled in compile_modes:
            m = measure_pair_stats(policy, d=d, hidden=hidden, blocks=blocks, tokens=tokens, steps=steps,
                             warmup=warmup, rounds=rounds, device=device, compile_model=compiled)
            out[policy]["compiled" if compiled else "eager"] = {
                "hand_tflops": flops / m["hand_s"] / 1e12, "precision_tflops": flops / m["precision_s"] / 1e12,
                **m}
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return out
