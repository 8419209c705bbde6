"""The one prepared GPU script: every benchmark row for a lent H200, in order of importance,
under a wall-clock budget, each row flushed to JSON as soon as it is measured.

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_run.py            # writes $OUT/<date>-<machine>-gpu.json
    python bench/gpu_run.py --smoke                               # every row, tiny sizes, CPU, < 2 min

Rows that need a missing package (jmp, bitsandbytes) or a dualprec feature that does not
exist yet are recorded with the reason; rows that no longer fit the budget are recorded as
"skipped: time budget".  Nothing is ever filled in with a made-up number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

# JAX must not grab 75% of the GPU up front: torch runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python bench/gpu_run.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(_ROOT))

from bench.harness import (  # noqa: E402
    BudgetGuard, Record, ResultsFile, Row, environment, reasons, results_path, rich_table, run_rows,
)
from bench.workloads import MLPConfig, WORKLOADS, policy_row  # noqa: E402

GPU_BUDGET_S = 330.0
SMOKE_BUDGET_S = 150.0  # a guard only: the smoke rows take about a minute on 2 cores


def _out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return _ROOT / "bench" / "results"


def _print_environment(env: dict) -> None:
    print(json.dumps(env, indent=1))
    try:
        import torch
        print(f"torch {torch.__version__} cuda={torch.version.cuda} available={torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(f"  {p.name}, {p.total_memory / 2**30:.0f} GiB, sm {p.major}.{p.minor}")
    except Exception as e:
        print(f"torch: {e}")
    try:
        import jax
        print(f"jax {jax.__version__} devices={jax.devices()}")
    except Exception as e:
        print(f"jax: {e}")
    for name in ("jmp", "bitsandbytes", "torchao"):
        try:
            __import__(name)
            print(f"{name}: available")
        except Exception as e:
            print(f"{name}: missing ({type(e).__name__}: {e})")


def _free() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


class Plan:
    """Sizes, step counts and device of one visit (full H200 or CPU smoke)."""

    def __init__(self, smoke: bool):
        import torch

        self.smoke = smoke
        self.device = "cuda" if (torch.cuda.is_available() and not smoke) else "cpu"
        if smoke:
            # one block keeps every JAX compilation short; the plumbing is the same
            self.mlp = self.mem = MLPConfig("mlp-smoke-1block", 64, 128, 1, 32)
            self.gemm_n, self.gemv = 64, (64, 128)
            self.timing = dict(warmup=1, rounds=2, steps_per_round=1)
            self.fp32_timing = self.timing
            self.scale = 0.1  # estimates shrink with the sizes
        else:
            self.mlp = WORKLOADS["mlp-gpu"]
            # bytes/param do not depend on depth or batch: one full-width block compiles faster
            self.mem = MLPConfig("mlp-gpu-1block", 4096, 16384, 1, 2048)
            self.gemm_n, self.gemv = 8192, (4096, 16384)
            self.timing = dict(warmup=3, rounds=3, steps_per_round=4)
            self.fp32_timing = dict(warmup=1, rounds=2, steps_per_round=2)  # ~1 s per fp32 step
            self.scale = 1.0
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # 32-true means fp32 matmuls


def _guarded(fn, backend: str, label: str, plan: Plan, workload: str, impls=("hand",), **fields):
    """Call `fn`; if a package it needs is missing, return records that say so."""
    def run():
        try:
            return fn()
        except ImportError as e:
            return [Record(workload=workload, backend=backend, policy=label, impl=impl, status="unavailable",
                           reason=f"{type(e).__name__}: {e}", device=plan.device, **fields) for impl in impls]
    return run


def _placeholders(workload, backend, label, impls=("hand", "dualprec"), mode="eager"):
    return lambda: [Record(workload=workload, backend=backend, policy=label, impl=i, mode=mode) for i in impls]


def _gemm_rows(plan: Plan) -> list[Row]:
    from bench.workloads import jax_gemm, micro_record, torch_gemm

    n, rows = plan.gemm_n, []
    work = f"gemm-{n}"
    for backend, make in (("torch", lambda k: torch_gemm(n, k, plan.device)), ("jax", lambda k: jax_gemm(n, k))):
        for kind in ("bf16", "fp8-e4m3"):
            fn = (lambda make=make, kind=kind, backend=backend: [micro_record(
                make(kind), workload=work, policy=kind, device=plan.device if backend == "torch" else None,
                **plan.timing)])
            rows.append(Row(f"{backend} GEMM {kind}", _guarded(fn, backend, kind, plan, work, ("ceiling",)),
                            3 * plan.scale + 1, placeholders=lambda b=backend, k=kind: [
                                Record(workload=work, backend=b, policy=k, impl="ceiling")]))
    return rows


def _external_torch_pair(plan: Plan, label: str, compiled: bool):
    """The hand vs Precision pair from bench/gpu_torch.py (its owner's workload), as records.
    Returns None when that module is absent, so the caller uses bench.workloads instead."""
    try:
        from bench import gpu_torch
    except ImportError:
        return None
    from bench.harness import summarize
    cfg = plan.mlp
    kwargs = dict(d=cfg.d_model, hidden=cfg.d_hidden, blocks=cfg.n_blocks, tokens=cfg.tokens,
                  steps=plan.timing["steps_per_round"], warmup=plan.timing["warmup"], rounds=plan.timing["rounds"],
                  device=plan.device, compile_model=compiled)
    t0 = time.perf_counter()
    if hasattr(gpu_torch, "measure_pair_stats"):
        m = gpu_torch.measure_pair_stats(label, **kwargs)
        rounds = {"hand": m["hand_rounds_s"], "dualprec": m["precision_rounds_s"]}
    else:
        hand_s, prec_s = gpu_torch.measure_pair(label, **kwargs)
        rounds = {"hand": [hand_s], "dualprec": [prec_s]}
    wall = time.perf_counter() - t0
    out = []
    for impl, samples in rounds.items():
        stats = summarize(samples)  # per-round means of gpu_torch's timed steps
        out.append(Record(
            workload=cfg.name, backend="torch", policy=label, impl=impl, mode="compiled" if compiled else "eager",
            policy_spec=policy_row(label).canonical(), device=plan.device, step_time=stats.to_dict(),
            flops_per_step=cfg.train_flops(), tflops=cfg.train_flops() / stats.median / 1e12,
            # gpu_torch folds compilation into its warm-up: the pair's wall time is all there is
            extra={"source": "bench.gpu_torch", "spread_of": "per-round means", "pair_wall_s": wall}))
    return out


def _torch_pair_row(plan: Plan, label: str, *, compiled=False, optional=False, estimate=15.0) -> Row:
    from bench.workloads import policy_records

    timing = plan.fp32_timing if label == "32-true" else plan.timing
    # the smoke run compiles with aot_eager: it checks the tracing, not inductor's minute of codegen
    backend = "aot_eager" if (compiled and plan.smoke) else None

    def run():
        if not (plan.smoke and compiled) and label in ("bf16-mixed", "16-mixed"):
            ext = _external_torch_pair(plan, label, compiled)
            if ext is not None:
                return ext
        return policy_records(plan.mlp, "torch", label, device=plan.device, compiled=compiled,
                              compile_backend=backend, **timing)
    name = f"torch {label} {'compiled' if compiled else 'eager'} hand vs dualprec"
    mode = "compiled" if compiled else "eager"
    return Row(name, _guarded(run, "torch", label, plan, plan.mlp.name, ("hand", "dualprec"), mode=mode),
               estimate * plan.scale + 1, optional=optional,
               placeholders=_placeholders(plan.mlp.name, "torch", label, mode=mode))


def _external_jax_pair(plan: Plan, label: str):
    """The hand vs Precision pair from bench/gpu_jax.py (its owner's workload; needs no jmp),
    as records; None when that module is absent."""
    try:
        from bench import gpu_jax
    except ImportError:
        return None
    from bench.harness import summarize
    cfg, t = plan.mlp, plan.timing
    res = gpu_jax.measure(d_model=cfg.d_model, d_hidden=cfg.d_hidden, blocks=cfg.n_blocks, tokens=cfg.tokens,
                          steps=t["steps_per_round"], warmup=t["warmup"], repeats=t["rounds"], policy=label)
    out = []
    for impl, key in (("hand", "hand"), ("dualprec", "precision")):
        stats = summarize(res[key]["step_s_all"])  # per-round means
        out.append(Record(
            workload=cfg.name, backend="jax", policy=label, impl=impl, mode="jit",
            policy_spec=policy_row(label).canonical(), device=res.get("device"), step_time=stats.to_dict(),
            compile_s=res[key]["compile_s"], flops_per_step=cfg.train_flops(),
            tflops=cfg.train_flops() / stats.median / 1e12,
            extra={"source": "bench.gpu_jax.measure", "spread_of": "per-round means"}))
    return out


def _jax_pair_row(plan: Plan, label: str, *, optional=False, estimate=30.0) -> Row:
    from bench.workloads import policy_records

    timing = plan.fp32_timing if label == "32-true" else plan.timing

    def run():
        _free()
        if label == "bf16-mixed":
            ext = _external_jax_pair(plan, label)
            if ext is not None:
                return ext
        return policy_records(plan.mlp, "jax", label, **timing)
    return Row(f"jax {label} hand vs dualprec",
               _guarded(run, "jax", label, plan, plan.mlp.name, ("hand", "dualprec"), mode="jit"),
               estimate * plan.scale + 1, optional=optional,
               placeholders=_placeholders(plan.mlp.name, "jax", label, mode="jit"))


def _gemv_rows(plan: Plan) -> list[Row]:
    from bench.workloads import jax_nf4_gemv, micro_record, torch_nf4_gemv

    d_in, d_out = plan.gemv
    work = f"nf4-gemv-{d_in}x{d_out}"
    rows = []
    for backend, make in (("torch", lambda: torch_nf4_gemv(d_in, d_out, plan.device)),
                          ("jax", lambda: jax_nf4_gemv(d_in, d_out))):
        fn = (lambda make=make, backend=backend: [micro_record(
            make(), workload=work, policy="nf4", device=plan.device if backend == "torch" else None,
            policy_spec=policy_row("nf4").canonical(), **plan.timing)])
        rows.append(Row(f"{backend} nf4 GEMV", _guarded(fn, backend, "nf4", plan, work), 5 * plan.scale + 1,
                        placeholders=lambda b=backend: [Record(workload=work, backend=b, policy="nf4")]))
    return rows


def _memory_rows(plan: Plan) -> list[Row]:
    from bench.memory import memory_record
    from bench.workloads import POLICIES

    rows = []
    for backend in ("torch", "jax"):
        for row in POLICIES:
            def fn(backend=backend, label=row.label):
                _free()
                return [memory_record(plan.mem, backend, label, device=plan.device)]
            rows.append(Row(f"memory {backend} {row.label}", _guarded(fn, backend, row.label, plan, plan.mem.name,
                                                                      mode="memory"),
                            (3 if backend == "torch" else 8) * plan.scale + 1,
                            placeholders=lambda b=backend, l=row.label: [
                                Record(workload=plan.mem.name, backend=b, policy=l, mode="memory")]))
    return rows


def build_plan(plan: Plan) -> list[Row]:
    """Every row, most important first; optional rows (torch.compile, the less asked-for
    JAX policies) come last and run only if the budget still has room for them."""
    rows = _gemm_rows(plan)
    rows.append(_torch_pair_row(plan, "bf16-mixed"))
    rows.append(_torch_pair_row(plan, "16-mixed"))
    rows.append(_torch_pair_row(plan, "bf16-true"))
    rows.append(_torch_pair_row(plan, "32-true", estimate=25.0))
    rows.append(_jax_pair_row(plan, "bf16-mixed"))
    rows.append(_jax_pair_row(plan, "bf16-true", estimate=25.0))
    rows.append(_torch_pair_row(plan, "fp8-current"))
    rows.append(_jax_pair_row(plan, "fp8-current"))
    rows.append(_torch_pair_row(plan, "nf4", estimate=20.0))
    rows.append(_jax_pair_row(plan, "nf4"))
    rows += _gemv_rows(plan)
    rows += _memory_rows(plan)
    rows.append(_torch_pair_row(plan, "bf16-mixed", compiled=True, optional=True, estimate=90.0))
    rows.append(_torch_pair_row(plan, "fp8-current", compiled=True, optional=True, estimate=60.0))
    rows.append(_jax_pair_row(plan, "16-mixed", optional=True))
    rows.append(_jax_pair_row(plan, "32-true", optional=True, estimate=35.0))
    rows.append(_torch_pair_row(plan, "16-mixed", compiled=True, optional=True, estimate=90.0))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every row at tiny sizes on CPU")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds (default {GPU_BUDGET_S:.0f}, "
                                                                   f"smoke {SMOKE_BUDGET_S:.0f})")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results)")
    args = parser.parse_args(argv)
    guard = BudgetGuard(args.budget or (SMOKE_BUDGET_S if args.smoke else GPU_BUDGET_S))

    import torch  # noqa: F401  (loaded first so the environment names the GPU)

    plan = Plan(args.smoke)
    env = environment()
    _print_environment(env)
    name = "gpu-smoke" if args.smoke else "gpu"
    path = results_path(name, env, _out_dir(args.out))
    results = ResultsFile(path, name=name, env=env, meta={"smoke": args.smoke, "budget_s": guard.budget_s,
                                                          "device": plan.device, "workload": plan.mlp.name})
    print(f"results -> {path}", flush=True)
    records = run_rows(build_plan(plan), guard, results, log=lambda m: print(m, flush=True))
    from rich.console import Console
    console = Console(width=160)
    console.print(rich_table(records, title=f"{name} {env['machine']} {env['date']}"))
    for line in reasons(records):
        console.print(f"  {line}", highlight=False)
    print(f"total {guard.elapsed():.1f}s; wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
