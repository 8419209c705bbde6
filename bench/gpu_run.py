"""The one prepared GPU script: every figure still unmeasured on the H200, most valuable first,
under a wall-clock budget, each row flushed to JSON the moment it is measured.

On the device (H200, via the device tool; it runs in the repository root, $OUT comes back):

    bash bench/gpu_setup.sh fetch          # HERE first, once: the jmp/bitsandbytes/torchao wheels into .whl/
    # then ONE device call, carry=[".whl"], timeout_s=600:
    bash bench/gpu_setup.sh install && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_run.py --budget 480
    # -> $OUT/<date>-h200-gpu.json: copy it to bench/results/ and commit it

    # rows a budget cut left out, in a later visit (prefixes of the row names below):
    ... python3 bench/gpu_run.py --only c1,d2 --budget 240

    python bench/gpu_run.py --smoke        # CPU, every row at tiny sizes (~1 min on 2 cores)

Rows, in this order (estimated H200 seconds, compilation included; a row whose estimate no
longer fits the budget is recorded as "skipped: time budget"):

    a  jax bf16-mixed: hand-written Flax (dtype=bf16) vs Precision vs dualprec_jax.autocast(fun)   ~70 s
       (the re-measure after the custom-VJP fix; last figure 1.83-1.89x slower; target within 1%)
    b1 torch bf16-mixed eager: hand torch.autocast vs Precision, bit-identical params + ratio      ~15 s
    b2 torch bf16-mixed compiled: the same under torch.compile                                     ~90 s
    c1 torch FP8 (current scaling, FP8Linear/_scaled_mm) vs bf16-mixed, both compiled (>= 1.45x)   ~90 s
    c2 jax FP8 (delayed scaling, native fp8 dot_general) vs bf16-mixed, both Precision (>= 1.6x)   ~50 s
    d1 torch nf4 4096->16384 at 16384 tokens and 1 token: dualprec_torch.quant vs bitsandbytes     ~15 s
    d2 jax nf4 (dualprec_jax.quant.QuantDense) at the same shapes, ratio to d1's bitsandbytes      ~20 s
    e  optional: jax FP8 current scaling vs bf16-mixed (~45 s); bytes/param of a 1-block MLP,
       bf16-mixed / fp8-current / nf4, both backends (~30 s)
    f  optional: jax bf16-true and 16-mixed, hand vs Precision (~40 s each; run if time is left)
    g  optional: rowwise / mxfp8 / nvfp4 vs bf16-mixed in both backends (~90 s torch, ~50 s jax
       each): the block-scaled recipes are emulated (dualprec has no block-scaled GEMM path; MX and
       NVFP4 GEMMs need Blackwell), so these rows give the emulation's cost, not an FP8 speed-up

About 6 minutes in all (plus ~20 s of imports) at the default budget of 480 s; the process
exits at budget + 60 s whatever it is doing (--hard-limit), so the device tool's 600 s per
command is never reached. While a row runs the file's meta names it ("in_progress"). A row
that raises records its error and the script goes on; a row needing a missing package
records "unavailable" (without the wheels: torch nf4 and the JAX memory rows); nothing is
ever filled in with a made-up number. Ratios are step time over the baseline's, medians of
per-round means, rounds interleaved so drift hits both sides alike; bit-identity (b1, b2) is
checked after the warm-up steps (same seed, input and step count on both sides).
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
    BudgetGuard,
    Record,
    ResultsFile,
    Row,
    environment,
    reasons,
    results_path,
    run_rows,
    summarize,
)

GPU_BUDGET_S = 480.0
SMOKE_BUDGET_S = 150.0  # a guard only: the smoke rows take about a minute on 2 cores
PREVIOUS_JAX_RATIO = "1.83-1.89x (before the custom-VJP fix, 2026-11-28)"

_SHARED: dict = {}  # figures one row hands to a later one (bitsandbytes times for the JAX nf4 row)


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
    """Drop what the previous row left: compiled graphs (they hold its models) and cached blocks."""
    try:
        import torch
        torch._dynamo.reset()
    except Exception:
        pass
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
            self.d, self.hidden, self.blocks, self.tokens = 64, 128, 1, 32
            self.nf4 = (64, 128, 32)          # d_in, d_out, tokens of the batched row
            self.gemv_inner = 2
            self.timing = dict(warmup=1, rounds=2, steps=1)
            self.scale = 0.1  # estimates shrink with the sizes
        else:
            # the H200 reference workload: 4 blocks of 4096 -> 16384 -> 4096, 537M parameters
            self.d, self.hidden, self.blocks, self.tokens = 4096, 16384, 4, 16384
            self.nf4 = (4096, 16384, 16384)
            self.gemv_inner = 20
            self.timing = dict(warmup=3, rounds=3, steps=4)
            self.scale = 1.0
        self.workload = f"mlp-{self.blocks}x{self.d}x{self.hidden}-t{self.tokens}"
        self.params = self.blocks * (2 * self.d + self.d * self.hidden + self.hidden + self.hidden * self.d
                                     + self.d)
        self.flops = 6.0 * self.params * self.tokens  # per training step
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False


# --------------------------------------------------------------------------- records


def _record(plan: Plan, backend: str, policy: str, impl: str, mode: str, timing: dict | None, *,
            workload: str | None = None, flops: float | None = None, **extra) -> Record:
    """A record from one timed variant: {"samples": [...], "compile_s": ...} or {"error": ...}."""
    workload = workload or plan.workload
    flops = plan.flops if flops is None else flops
    if timing is None or "error" in timing:
        return Record(workload=workload, backend=backend, policy=policy, impl=impl, mode=mode, status="error",
                      reason=(timing or {}).get("error", "not measured"), device=plan.device, extra=extra)
    stats = summarize(timing["samples"])
    return Record(workload=workload, backend=backend, policy=policy, impl=impl, mode=mode, device=plan.device,
                  step_time=stats.to_dict(), compile_s=timing.get("compile_s"), flops_per_step=flops,
                  tflops=(flops / stats.median / 1e12) if flops and not plan.smoke else None,
                  extra={"spread_of": "per-round means", **extra})


def _ratio(records: list[Record], num: str, den: str) -> float | None:
    by = {r.impl: r for r in records if r.ok and r.step_time}
    if num in by and den in by:
        return by[num].step_time["median"] / by[den].step_time["median"]
    return None


def _guard_import(fn, plan: Plan, backend: str, policy: str, impls, mode: str, workload: str | None = None):
    """Run `fn`; a missing package becomes "unavailable" records instead of an error."""
    def run():
        try:
            return fn()
        except ImportError as e:
            return [Record(workload=workload or plan.workload, backend=backend, policy=policy, impl=i, mode=mode,
                           status="unavailable", reason=f"{type(e).__name__}: {e}", device=plan.device)
                    for i in impls]
    return run


def _placeholders(plan: Plan, backend: str, policy: str, impls, mode: str, workload: str | None = None):
    return lambda: [Record(workload=workload or plan.workload, backend=backend, policy=policy, impl=i, mode=mode)
                    for i in impls]


# --------------------------------------------------------------------------- timing


def _time_jax(variants: dict, x, *, warmup: int, rounds: int, steps: int) -> dict:
    """Compile each `step(state, x) -> state` (state donated), then time them in interleaved
    rounds. A variant that fails to build, compile or run gets {"error": ...}; the rest go on."""
    import jax

    out, live = {}, {}
    for name, make in variants.items():
        try:
            step, state = make()
            fn = jax.jit(step, donate_argnums=(0,))
            t0 = time.perf_counter()
            state = jax.block_until_ready(fn(state, x))
            compile_s = time.perf_counter() - t0
            for _ in range(warmup):
                state = fn(state, x)
            jax.block_until_ready(state)
            live[name] = [fn, state]
            out[name] = {"samples": [], "compile_s": compile_s}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    for _ in range(rounds):
        for name, entry in live.items():
            if "error" in out[name]:
                continue
            fn, state = entry
            try:
                t0 = time.perf_counter()
                for _ in range(steps):
                    state = fn(state, x)
                jax.block_until_ready(state)
                out[name]["samples"].append((time.perf_counter() - t0) / steps)
                entry[1] = state
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    live.clear()
    return out


def _sync_torch(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_torch(steps_by_name: dict, device: str, *, warmup: int, rounds: int, steps: int,
                after_warmup=None) -> dict:
    """Time torch step callables in alternating rounds (wall clock between synchronisations).
    The first warm-up call is reported as compile_s. `after_warmup()` runs once all have warmed
    up (the bit-identity check); its result is returned under "_after_warmup"."""
    out, ok = {}, {}
    for name, step in steps_by_name.items():
        try:
            _sync_torch(device)
            t0 = time.perf_counter()
            step()
            _sync_torch(device)
            out[name] = {"samples": [], "compile_s": time.perf_counter() - t0}
            for _ in range(max(warmup - 1, 0)):
                step()
            ok[name] = step
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if after_warmup is not None:
        try:
            out["_after_warmup"] = after_warmup()
        except Exception as e:
            out["_after_warmup"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    names = list(ok)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if "error" in out[name]:
                continue
            try:
                _sync_torch(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    ok[name]()
                _sync_torch(device)
                out[name]["samples"].append((time.perf_counter() - t0) / steps)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


# --------------------------------------------------------------------------- (a) JAX Precision / autocast


def _jax_mlp(plan: Plan):
    import jax
    import jax.numpy as jnp

    from bench.gpu_jax import MLPStack

    x = jax.random.normal(jax.random.key(1), (plan.tokens, plan.d), jnp.float32)
    return MLPStack, x


def _jax_loss(y):
    import jax.numpy as jnp
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def _jax_precision_rows(plan: Plan) -> list[Record]:
    """Hand-written Flax bf16 vs Precision("bf16-mixed") vs dualprec_jax.autocast(loss, policy)."""
    import jax
    import jax.numpy as jnp
    import optax

    import dualprec_jax
    from dualprec_jax import Precision

    _free()
    MLPStack, x = _jax_mlp(plan)
    prec = Precision("bf16-mixed")
    plain = MLPStack(plan.d, plan.hidden, plan.blocks)
    hand_model = MLPStack(plan.d, plan.hidden, plan.blocks, dtype=jnp.bfloat16)
    params = prec.init(plain, jax.random.key(0), x)["params"]
    tx = optax.adamw(1e-4)

    def fresh():
        return jax.tree.map(jnp.copy, params)

    def make_hand():
        def step(state, x):
            p, opt = state
            g = jax.grad(lambda q: _jax_loss(hand_model.apply({"params": q}, x)))(p)
            u, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, u), opt
        p = fresh()
        return step, (p, tx.init(p))

    def make_precision():
        wrapped = prec.wrap_optimizer(tx)

        def step(state, x):
            p, s = state
            g = jax.grad(lambda q: prec.scale_loss(_jax_loss(prec.apply(plain, {"params": q}, x)), s.loss_scale))(p)
            u, s = wrapped.update(g, s, p)
            return optax.apply_updates(p, u), s
        p = fresh()
        return step, (p, wrapped.init(p))

    def make_autocast():
        loss = dualprec_jax.autocast(lambda q, x: _jax_loss(plain.apply({"params": q}, x)), "bf16-mixed")

        def step(state, x):
            p, opt = state
            g = jax.grad(loss)(p, x)
            u, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, u), opt
        p = fresh()
        return step, (p, tx.init(p))

    t = _time_jax({"hand": make_hand, "dualprec": make_precision, "autocast": make_autocast}, x, **plan.timing)
    recs = [_record(plan, "jax", "bf16-mixed", impl, "jit", t[impl], what=what)
            for impl, what in (("hand", "Flax Dense/LayerNorm dtype=bf16, float32 params, optax adamw"),
                               ("dualprec", "dualprec_jax.Precision('bf16-mixed').apply + wrap_optimizer"),
                               ("autocast", "dualprec_jax.autocast(loss_fn, 'bf16-mixed') over the float32 model"))]
    for r in recs[1:]:
        r.extra["ratio_to_hand"] = _ratio(recs, r.impl, "hand")
        r.extra["previous_ratio"] = PREVIOUS_JAX_RATIO
        r.extra["target"] = "within 1% of hand-written"
    return recs


# --------------------------------------------------------------------------- (b) torch Precision vs autocast


def _torch_compile(model, plan: Plan):
    import torch
    # the smoke run compiles with aot_eager: it checks the tracing, not inductor's codegen
    return torch.compile(model, backend="aot_eager") if plan.smoke else torch.compile(model)


def _params_identical(a, b) -> dict:
    import torch

    diff, same = 0.0, True
    for pa, pb in zip(a.parameters(), b.parameters()):
        if not torch.equal(pa, pb):
            same = False
            diff = max(diff, float((pa.detach().float() - pb.detach().float()).abs().max()))
    return {"bit_identical": same, "max_abs_diff": diff}


def _torch_precision_rows(plan: Plan, compiled: bool) -> list[Record]:
    """Hand-written torch.autocast loop vs Precision("bf16-mixed"), same seed and input: after
    the warm-up steps (the same number on both) the parameters are compared bit for bit."""
    import torch

    from bench.gpu_torch import _build, hand_step, precision_step
    from dualprec_torch import Precision

    _free()
    dev = plan.device
    x = torch.randn(plan.tokens, plan.d, device=dev)
    model_h, opt_h = _build(plan.d, plan.hidden, plan.blocks, dev)
    prec = Precision("bf16-mixed", device=dev)
    model_p, opt_p = prec.setup(*_build(plan.d, plan.hidden, plan.blocks, dev))
    run_h, run_p = (_torch_compile(model_h, plan), _torch_compile(model_p, plan)) if compiled else (model_h, model_p)
    steps = {"hand": lambda: hand_step(run_h, opt_h, None, x, torch.bfloat16, torch.device(dev).type),
             "dualprec": lambda: precision_step(prec, run_p, opt_p, x)}
    warm = max(plan.timing["warmup"], 2)
    t = _time_torch(steps, dev, warmup=warm, rounds=plan.timing["rounds"], steps=plan.timing["steps"],
                    after_warmup=lambda: _params_identical(model_h, model_p))
    mode = "compiled" if compiled else "eager"
    ident = t.get("_after_warmup", {})
    recs = [_record(plan, "torch", "bf16-mixed", "hand", mode, t["hand"], what="torch.autocast + AdamW"),
            _record(plan, "torch", "bf16-mixed", "dualprec", mode, t["dualprec"],
                    what="dualprec_torch.Precision('bf16-mixed') setup/autocast/backward/step",
                    identity_after_steps=warm, **ident)]
    recs[1].extra["ratio_to_hand"] = _ratio(recs, "dualprec", "hand")
    recs[1].extra["target"] = "bit-identical and within 1% step time"
    if dev == "cpu":
        recs[1].extra["note"] = "CPU: Precision emulates the CUDA table, so bit-identity is not promised here"
    return recs


# --------------------------------------------------------------------------- (c) FP8


def _torch_fp8_rows(plan: Plan, recipe: str = "current") -> list[Record]:
    """Precision("bf16-mixed,fp8=<recipe>") vs Precision("bf16-mixed"), both compiled, one
    process, interleaved rounds. Per-tensor recipes run FP8Linear over torch._scaled_mm; the
    block-scaled ones (rowwise, mxfp8, nvfp4) run dualprec_torch.blockscale's emulation on any
    device (no block-scaled _scaled_mm path is built; MX/NVFP4 hardware GEMMs are Blackwell-only)."""
    import torch

    from bench.gpu_torch import _build, precision_step
    from dualprec import Policy
    from dualprec_torch import Precision

    _free()
    dev = plan.device
    x = torch.randn(plan.tokens, plan.d, device=dev)
    steps, notes = {}, {}
    block = Policy.parse(f"bf16-mixed,fp8={recipe}").fp8_recipe.block_scaled
    for impl, spec in (("hand", "bf16-mixed"), ("fp8", f"bf16-mixed,fp8={recipe}")):
        try:
            model, opt = _build(plan.d, plan.hidden, plan.blocks, dev)
            if block and "fp8" in spec:
                notes[impl] = "emulated block scaling (dualprec_torch.blockscale): no hardware block-scaled GEMM"
            if dev == "cpu" and "fp8" in spec and not block:
                # no FP8 GEMM on a CPU: the same layers with float32 GEMMs on the FP8 operands
                from dualprec_torch.fp8 import convert_module
                model = convert_module(model, Policy.parse(spec), emulate=True)
                spec_run = "bf16-mixed"
                notes[impl] = "CPU smoke: FP8Linear(emulate=True) under Precision('bf16-mixed')"
            else:
                spec_run = spec
            prec = Precision(spec_run, device=dev)
            model, opt = prec.setup(model, opt)
            run = _torch_compile(model, plan)
            steps[impl] = (lambda prec=prec, run=run, opt=opt: precision_step(prec, run, opt, x))
        except Exception as e:
            steps[impl] = (lambda e=e: (_ for _ in ()).throw(e))
    t = _time_torch(steps, dev, warmup=plan.timing["warmup"], rounds=plan.timing["rounds"],
                    steps=plan.timing["steps"])
    policy = "fp8-vs-bf16" if recipe == "current" else f"fp8-{recipe}-vs-bf16"
    how = "blockscale emulation" if block else "FP8Linear, torch._scaled_mm"
    recs = [_record(plan, "torch", policy, "hand", "compiled", t["hand"],
                    what="Precision('bf16-mixed'), compiled (the baseline)"),
            _record(plan, "torch", policy, "fp8", "compiled", t["fp8"],
                    what=f"Precision('bf16-mixed,fp8={recipe}'): {how}, compiled",
                    **({"note": notes["fp8"]} if "fp8" in notes else {}))]
    r = _ratio(recs, "fp8", "hand")
    recs[1].extra["speedup_over_bf16"] = (1.0 / r) if r else None
    if recipe == "current":
        recs[1].extra["target"] = ">= 1.45x the bf16-mixed step (torchao tensorwise compiled: 1.40x)"
    return recs


def _jax_fp8_rows(plan: Plan, recipe: str = "delayed") -> list[Record]:
    """Precision("bf16-mixed,fp8=<recipe>") (native fp8 dot_general) vs Precision("bf16-mixed")."""
    import jax
    import optax

    from dualprec_jax import Precision
    from dualprec_jax import fp8 as jfp8

    _free()
    MLPStack, x = _jax_mlp(plan)
    plain = MLPStack(plan.d, plan.hidden, plan.blocks)
    tx = optax.adamw(1e-4)

    def make(spec):
        def build():
            prec = Precision(spec)
            variables = prec.init(plain, jax.random.key(0), x)
            has_state = set(variables) != {"params"}

            def step(state, x):
                v, opt = state
                g = jax.grad(lambda w: _jax_loss(prec.apply(plain, w, x)))(v)
                u, opt = tx.update(g["params"], opt, v["params"])
                new = {**v, "params": optax.apply_updates(v["params"], u)}
                if has_state:
                    new = jfp8.apply_fp8_grads(new, g)
                return new, opt
            return step, (variables, tx.init(variables["params"]))
        return build

    t = _time_jax({"hand": make("bf16-mixed"), "fp8": make(f"bf16-mixed,fp8={recipe}")}, x, **plan.timing)
    policy = f"fp8-{recipe}-vs-bf16"
    recs = [_record(plan, "jax", policy, "hand", "jit", t["hand"], what="Precision('bf16-mixed') (the baseline)"),
            _record(plan, "jax", policy, "fp8", "jit", t["fp8"],
                    what=f"Precision('bf16-mixed,fp8={recipe}'): native float8 lax.dot_general"
                    + (" on block-scaled operands (emulated scaling)" if recipe not in ("delayed", "current") else ""))]
    r = _ratio(recs, "fp8", "hand")
    recs[1].extra["speedup_over_bf16"] = (1.0 / r) if r else None
    recs[1].extra["target"] = ">= 1.6x the bf16-mixed step (Flax Fp8DirectDotGeneralOp: 1.56x)"
    return recs


# --------------------------------------------------------------------------- (d) nf4


def _nf4_shapes(plan: Plan):
    d_in, d_out, tokens = plan.nf4
    return d_in, d_out, (("batched", tokens, 1), ("gemv", 1, plan.gemv_inner))


def _torch_nf4_rows(plan: Plan) -> list[Record]:
    """dualprec_torch.quant (Precision's quantize_module) vs a plain bitsandbytes Linear4bit,
    the same weight, forward only (inference), at `tokens` tokens and at 1 token."""
    import bitsandbytes as bnb  # noqa: F401  (ImportError -> "unavailable")
    import torch
    from torch import nn

    from dualprec import Policy
    from dualprec_torch.quant import quantize_module

    _free()
    dev = plan.device
    d_in, d_out, shapes = _nf4_shapes(plan)
    torch.manual_seed(0)
    w = torch.randn(d_out, d_in) * 0.02
    ref = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
    ref = ref.to(dev)
    lin = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    ours = quantize_module(nn.Sequential(lin), Policy.parse("bf16-mixed,quant=nf4"), dev)
    recs = []
    for shape, tokens, inner in shapes:
        x = torch.randn(tokens, d_in, device=dev, dtype=torch.bfloat16)

        def loop(layer, x=x, inner=inner):
            with torch.inference_mode():
                for _ in range(inner):
                    y = layer(x)
            return y
        t = _time_torch({"bitsandbytes": lambda: loop(ref), "dualprec": lambda: loop(ours)}, dev,
                        warmup=plan.timing["warmup"], rounds=plan.timing["rounds"], steps=plan.timing["steps"])
        flops = 2.0 * tokens * d_in * d_out
        work = f"nf4-{d_in}x{d_out}-t{tokens}"
        pair = []
        for impl in ("bitsandbytes", "dualprec"):
            tt = t[impl]
            if "samples" in tt:
                tt = {**tt, "samples": [s / inner for s in tt["samples"]]}  # seconds per call
            pair.append(_record(plan, "torch", "nf4", "hand" if impl == "bitsandbytes" else impl, "eager", tt,
                                workload=work, flops=flops, shape=shape, calls_per_step=inner,
                                what={"bitsandbytes": "bnb.nn.Linear4bit nf4, bf16 compute",
                                      "dualprec": "dualprec_torch.quant.quantize_module(nf4)"}[impl]))
        try:
            with torch.inference_mode():
                diff = float((ref(x).float() - ours(x).float()).abs().max())
            pair[1].extra["max_abs_diff_vs_bitsandbytes"] = diff
        except Exception as e:
            pair[1].extra["max_abs_diff_vs_bitsandbytes"] = f"{type(e).__name__}: {e}"[:200]
        pair[1].extra["ratio_to_bitsandbytes"] = _ratio(pair, "dualprec", "hand")
        if pair[0].ok:
            _SHARED[f"bnb-{shape}"] = pair[0].step_time["median"]
        recs += pair
    if dev == "cuda":
        recs[-1].extra["gemv_floor_s"] = d_in * d_out / 2 / 4.8e12  # nf4 bytes at 4.8 TB/s
    return recs


def _jax_nf4_rows(plan: Plan) -> list[Record]:
    """dualprec_jax.quant.QuantDense (nf4, bf16 compute) at the same shapes, forward only; the
    `inner` calls of the 1-token row run inside one jit (a fori_loop), so Python dispatch is
    not what is timed. Ratios are to the bitsandbytes times of the torch nf4 row."""
    import jax
    import jax.numpy as jnp

    from dualprec_jax.quant import QuantDense

    _free()
    d_in, d_out, shapes = _nf4_shapes(plan)
    layer = QuantDense(d_out, mode="nf4", use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = layer.init(jax.random.key(0), jnp.zeros((1, d_in), jnp.bfloat16))
    recs = []
    for shape, tokens, inner in shapes:
        x = jax.random.normal(jax.random.key(1), (tokens, d_in), jnp.bfloat16)

        def make_loop(inner=inner, tokens=tokens):
            def step(state, x):
                v, acc = state

                def body(i, carry):
                    xi, a = carry
                    # the float leaves (absmax) depend on the carry, so XLA cannot hoist the
                    # dequantization out of the loop; x * 0 is not folded for floats
                    vi = jax.tree.map(lambda leaf: leaf * (1 + 0 * a[0]).astype(leaf.dtype)
                                      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, v)
                    y = layer.apply(vi, xi)
                    return xi + y[:, :1] * 0, a + y[:, 0].astype(jnp.float32)  # a dependency, no CSE
                xi, acc = jax.lax.fori_loop(0, inner, body, (x, acc))
                return v, acc
            # the state is donated: each variant gets its own copy of the quantized weights
            return step, (jax.tree.map(jnp.copy, variables), jnp.zeros((tokens,), jnp.float32))

        def make_dispatch(inner=inner):
            def step(state, x):  # one call per jit; the Python loop below dispatches `inner` of them
                v, _ = state
                return v, layer.apply(v, x)
            return step, (jax.tree.map(jnp.copy, variables), jnp.zeros((tokens, d_out), jnp.bfloat16))

        t = _time_jax({"dualprec": make_loop}, x, **plan.timing)
        td = _time_jax({"dualprec-dispatch": make_dispatch}, x, warmup=plan.timing["warmup"],
                       rounds=plan.timing["rounds"], steps=plan.timing["steps"] * inner)
        for impl, tt, per, what in (
                ("dualprec", t["dualprec"], inner, f"{inner} calls in one jit (fori_loop)"),
                ("dualprec-dispatch", td["dualprec-dispatch"], 1, "one jit call per forward, async dispatch")):
            if "samples" in tt:
                tt = {**tt, "samples": [s / per for s in tt["samples"]]}  # seconds per forward
            rec = _record(plan, "jax", "nf4", impl, "jit", tt, workload=f"nf4-{d_in}x{d_out}-t{tokens}",
                          flops=2.0 * tokens * d_in * d_out, shape=shape,
                          what=f"dualprec_jax.quant.QuantDense nf4, bf16 compute, forward; {what}")
            bnb_s = _SHARED.get(f"bnb-{shape}")
            if rec.ok and bnb_s:
                rec.extra["bitsandbytes_s"] = bnb_s
                rec.extra["ratio_to_bitsandbytes"] = rec.step_time["median"] / bnb_s
            rec.extra["target"] = "at least as fast as bitsandbytes (1-token floor ~7 us)"
            recs.append(rec)
    return recs


# --------------------------------------------------------------------------- (e) memory


def _memory_rows(plan: Plan) -> list[Row]:
    from bench.memory import memory_record
    from bench.workloads import MLPConfig

    cfg = (MLPConfig("mlp-smoke-1block", 64, 128, 1, 32) if plan.smoke
           else MLPConfig("mlp-gpu-1block", 4096, 16384, 1, 2048))  # bytes/param do not depend on depth
    rows = []
    for backend in ("torch", "jax"):
        for label in ("bf16-mixed", "fp8-current", "nf4"):
            def fn(backend=backend, label=label):
                _free()
                return [memory_record(cfg, backend, label, device=plan.device)]
            rows.append(Row(f"memory {backend} {label}",
                            _guard_import(fn, plan, backend, label, ("hand",), "memory", cfg.name),
                            (3 if backend == "torch" else 6) * plan.scale + 1, optional=True,
                            placeholders=_placeholders(plan, backend, label, ("hand",), "memory", cfg.name)))
    return rows


# --------------------------------------------------------------------------- plan


def build_plan(plan: Plan) -> list[Row]:
    """Every row, most valuable first; the optional ones run only while the budget has room
    for them and for every required row after them."""
    s = plan.scale

    def row(name, fn, backend, policy, impls, mode, estimate, optional=False):
        return Row(name, _guard_import(fn, plan, backend, policy, impls, mode), estimate * s + 1,
                   optional=optional, placeholders=_placeholders(plan, backend, policy, impls, mode))

    rows = [
        row("a jax bf16-mixed hand vs Precision vs autocast", lambda: _jax_precision_rows(plan), "jax",
            "bf16-mixed", ("hand", "dualprec", "autocast"), "jit", 70),
        row("b1 torch bf16-mixed eager hand vs Precision", lambda: _torch_precision_rows(plan, False), "torch",
            "bf16-mixed", ("hand", "dualprec"), "eager", 15),
        row("b2 torch bf16-mixed compiled hand vs Precision", lambda: _torch_precision_rows(plan, True), "torch",
            "bf16-mixed", ("hand", "dualprec"), "compiled", 90),
        row("c1 torch fp8 current vs bf16-mixed, compiled", lambda: _torch_fp8_rows(plan), "torch",
            "fp8-vs-bf16", ("hand", "fp8"), "compiled", 90),
        row("c2 jax fp8 delayed vs bf16-mixed", lambda: _jax_fp8_rows(plan, "delayed"), "jax",
            "fp8-delayed-vs-bf16", ("hand", "fp8"), "jit", 50),
        Row("d1 torch nf4 dualprec_torch.quant vs bitsandbytes",
            _guard_import(lambda: _torch_nf4_rows(plan), plan, "torch", "nf4", ("hand", "dualprec"), "eager",
                          "nf4"), 15 * s + 1,
            placeholders=_placeholders(plan, "torch", "nf4", ("hand", "dualprec"), "eager", "nf4")),
        Row("d2 jax nf4 QuantDense", _guard_import(lambda: _jax_nf4_rows(plan), plan, "jax", "nf4",
                                                   ("dualprec", "dualprec-dispatch"),
                                                   "jit", "nf4"), 20 * s + 1,
            placeholders=_placeholders(plan, "jax", "nf4", ("dualprec", "dualprec-dispatch"), "jit", "nf4")),
        row("e jax fp8 current vs bf16-mixed", lambda: _jax_fp8_rows(plan, "current"), "jax",
            "fp8-current-vs-bf16", ("hand", "fp8"), "jit", 45, optional=True),
    ]
    rows += _memory_rows(plan)
    for recipe in ("rowwise", "mxfp8", "nvfp4"):  # emulated block scaling: its cost on a GPU, no target
        rows.append(row(f"g torch fp8 {recipe} (emulated) vs bf16-mixed, compiled",
                        lambda recipe=recipe: _torch_fp8_rows(plan, recipe), "torch", f"fp8-{recipe}-vs-bf16",
                        ("hand", "fp8"), "compiled", 90, optional=True))
        rows.append(row(f"g jax fp8 {recipe} (emulated) vs bf16-mixed", lambda recipe=recipe: _jax_fp8_rows(plan, recipe),
                        "jax", f"fp8-{recipe}-vs-bf16", ("hand", "fp8"), "jit", 50, optional=True))
    for label in ("bf16-true", "16-mixed"):  # the rest of the old JAX re-measure, if time is left
        rows.append(row(f"f jax {label} hand vs Precision", lambda label=label: _jax_measure_rows(plan, label), "jax",
                        label, ("hand", "dualprec"), "jit", 40, optional=True))
    return rows


def _jax_measure_rows(plan: Plan, label: str) -> list[Record]:
    """bench.gpu_jax.measure's pair (hand-written Flax with the policy's dtypes, jmp loss
    scaling where jmp is installed, vs Precision) for another policy."""
    from bench import gpu_jax

    _free()
    t = plan.timing
    res = gpu_jax.measure(d_model=plan.d, d_hidden=plan.hidden, blocks=plan.blocks, tokens=plan.tokens,
                          steps=t["steps"], warmup=t["warmup"], repeats=t["rounds"], policy=label)
    recs = [_record(plan, "jax", label, impl, "jit",
                    {"samples": res[key]["step_s_all"], "compile_s": res[key]["compile_s"]},
                    what="bench.gpu_jax.measure")
            for impl, key in (("hand", "hand"), ("dualprec", "precision"))]
    recs[1].extra["ratio_to_hand"] = _ratio(recs, "dualprec", "hand")
    return recs


def _summary(records: list[Record]) -> list[str]:
    lines = []
    for r in records:
        st = r.step_time or {}
        ms = f"{st['median'] * 1e3:9.3f} ms" if st.get("median") else " " * 12
        keys = ("ratio_to_hand", "speedup_over_bf16", "ratio_to_bitsandbytes", "bit_identical")
        bits = " ".join(f"{k}={r.extra[k]:.3f}" if isinstance(r.extra.get(k), float) else f"{k}={r.extra[k]}"
                        for k in keys if r.extra.get(k) is not None)
        tf = f"{r.tflops:7.1f} TF/s" if r.tflops else ""
        lines.append(f"{r.workload:28s} {r.backend:5s} {r.policy:20s} {r.impl:12s} {r.mode:8s} {ms} {tf} "
                     f"{r.status} {bits}")
    return lines


def _watchdog(limit_s: float) -> None:
    """Exit the process after `limit_s` seconds: a row stuck in a compiler cannot eat the rest
    of the device time. The results file is not touched (it is complete up to the last row)."""
    import threading

    def fire():
        print(f"[hard limit] {limit_s:.0f}s reached: exiting; finished rows are in the results file", flush=True)
        os._exit(124)
    t = threading.Timer(limit_s, fire)
    t.daemon = True
    t.start()


def _announce(name: str, run, results: ResultsFile):
    def wrapped():
        results.meta["in_progress"] = name
        results.flush()
        try:
            return run()
        finally:
            results.meta["in_progress"] = None
            results.meta.setdefault("finished_rows", []).append(name)
    return wrapped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every row at tiny sizes on CPU")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds (default {GPU_BUDGET_S:.0f}, "
                                                                   f"smoke {SMOKE_BUDGET_S:.0f})")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results)")
    parser.add_argument("--only", default=None, help="comma-separated row prefixes to run (e.g. a,c1)")
    parser.add_argument("--hard-limit", type=float, default=None,
                        help="seconds after which the process exits whatever it is doing (default budget + 60); "
                             "every finished row is already on disk")
    args = parser.parse_args(argv)
    guard = BudgetGuard(args.budget or (SMOKE_BUDGET_S if args.smoke else GPU_BUDGET_S))
    _watchdog(args.hard_limit or guard.budget_s + 60.0)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import torch  # noqa: F401  (loaded first so the environment names the GPU)

    plan = Plan(args.smoke)
    env = environment()
    _print_environment(env)
    name = "gpu-smoke" if args.smoke else "gpu"
    path = results_path(name, env, _out_dir(args.out))
    results = ResultsFile(path, name=name, env=env, meta={"smoke": args.smoke, "budget_s": guard.budget_s,
                                                          "device": plan.device, "workload": plan.workload,
                                                          "params": plan.params, "script": "bench/gpu_run.py"})
    print(f"results -> {path}", flush=True)
    rows = build_plan(plan)
    if args.only:
        wanted = tuple(p.strip() + " " for p in args.only.split(","))
        rows = [r for r in rows if r.name.startswith(wanted)]
    for r in rows:  # the file names the row in flight, so a run cut short says where
        r.run = _announce(r.name, r.run, results)
    records = run_rows(rows, guard, results, log=lambda m: print(m, flush=True))
    for line in _summary(records):
        print(line, flush=True)
    for line in reasons(records):
        print(f"  {line}", flush=True)
    results.meta["total_s"] = guard.elapsed()
    results.flush()
    print(f"total {guard.elapsed():.1f}s; wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
