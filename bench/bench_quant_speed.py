"""Quantized linear layers on the CPU: JAX (dualprec_jax.quant) and torch (dualprec_torch's
bitsandbytes subclasses) against plain bitsandbytes in the same run, and the memory each mode
holds, measured as resident-set growth.

    python bench/bench_quant_speed.py [--modes nf4,nf4-dq,fp4,fp4-dq,int8] [--tokens 1,64,512]
        [--computes float32,bfloat16] [--shapes 8192x2048,2048x8192] [--rank 16] [--rounds 5]
        [--threads N] [--memory] [--name quant-speed]

Rows, per (mode, compute dtype, tokens, shape out x in):

- ``bnb-train``: a plain ``bnb.nn.Linear4bit`` in train mode under ``no_grad``: its exact
  path (dequantize, then ``F.linear``).  int8: ``bnb.nn.Linear8bitLt`` (inference weights).
- ``bnb-eval``: the same layer in eval mode (4-bit: on CPUs with AVX512-BF16 bitsandbytes
  repacks the weight once for a fused kernel that rounds the input and absmax to bfloat16,
  so it is not the same arithmetic).
- ``torch``: dualprec_torch's layer (``QuantLinear4bit`` / ``QuantLinear8bit``), forward.
- ``jax``: ``quantized_linear`` under ``jax.jit``, forward.
- ``*-qlora-step`` (with ``--rank`` > 0; int8 too): forward and backward of a rank-r adapter
  (peft's ``x @ A @ B * scale`` on top of the layer) to the adapter's and the input's
  gradients of sum(y**2) (a loss whose gradient needs the layer's output): JAX ``jax.grad``,
  bitsandbytes and dualprec_torch through autograd.

Memory (``--memory``): per backend and mode, a fresh process quantizes ``--memory-layers``
layers of ``--memory-width`` squared (each from a float32 weight freed right after), and the
resident set it gives back when those layers are dropped (after ``malloc_trim``) is what they
held, in bits per parameter; the growth while building (temporaries included) is recorded too.

Every row of one (mode, compute, tokens, shape) is timed interleaved with the others
(bench.harness.time_interleaved), and ratios (median over median) are against the
bitsandbytes rows of the same cell.  The JSON holds medians, quartiles and min/max.
``--threads N`` pins the whole process (JAX, torch, bitsandbytes' OpenMP) to the first N CPUs
before either framework is imported and sets torch's thread count; at one thread XLA's Eigen
pool is off too (``--xla_cpu_multi_thread_eigen=false``).  Other kernel
paths are chosen outside (``ATEN_CPU_CAPABILITY=avx2``); the CPU's model string, family,
model and ISA flags (AVX2, AVX512, AVX512-BF16, AMX) are recorded with the results.

Memory (``--memory``) also records, per backend (JAX, dualprec_torch, plain bitsandbytes),
mode and compute dtype, the peak resident set a forward adds on top of one built layer
(VmHWM after ``/proc/self/clear_refs``, so the dequantized temporaries each path makes are
measured, not computed), and for JAX the bytes of live device buffers the runtime reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench import harness  # noqa: E402

FOUR_BIT = ("nf4", "nf4-dq", "fp4", "fp4-dq")


def _weight(out_f, in_f, seed=0):
    import numpy as np

    return (np.random.default_rng(seed).standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)


def _bnb_layer(mode, w, compute):
    import bitsandbytes as bnb
    import torch

    out_f, in_f = w.shape
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(torch.from_numpy(w).half(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=getattr(torch, compute),
                                  compress_statistics=mode.endswith("-dq"), quant_type=mode[:3])
        layer.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, quant_type=mode[:3],
                                         compress_statistics=mode.endswith("-dq"))
    return layer.to("cpu")


def _dualprec_torch_layer(mode, w, compute):
    import torch
    from torch import nn

    from dualprec_torch.quant import quantize_module

    net = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w))
    quantize_module(net, f"params=float32,compute={compute},quant={mode}")
    return net[0]


def _jax_fns(mode, w, compute, rank):
    import jax
    import jax.numpy as jnp

    from dualprec_jax import quant

    spec = quant.QuantSpec(mode, compute_dtype=compute)
    q = jax.jit(quant._quantize_weight, static_argnums=1)(jnp.asarray(w), spec)
    out_f = w.shape[0]
    fwd = jax.jit(lambda x, q: quant.quantized_linear(x, q, spec, out_f))
    step = None
    if rank and spec.frozen:  # 4-bit and int8 (frozen int8 weights under a LoRA adapter)
        def loss(ab, x, q):
            y = quant.quantized_linear(x, q, spec, out_f, lora=ab, lora_scale=2.0).astype(jnp.float32)
            return (y * y).sum()  # its gradient needs the layer's output, not only the adapter's
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))  # the adapter's and the input's gradients
    return q, fwd, step


def _lora(in_f, out_f, rank, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(rank, in_f, generator=g) * 2 - 1) / in_f ** 0.5
    b = torch.randn(out_f, rank, generator=g) * 0.01
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "avx_vnni")


def cpu_identity() -> dict:
    """The CPU's model string, family/model numbers and the ISA flags that pick kernel paths
    (from /proc/cpuinfo), and the CPUs this process may run on."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "cpu family", "model", "stepping", "flags") and key not in info:
                    info[key] = value
                if not line.strip() and info:
                    break
    except OSError:
        pass
    flags = set(info.pop("flags", "").split())
    return {"cpu_model": info.get("model name"), "cpu_family": info.get("cpu family"), "cpu_model_number": info.get("model"),
            "cpu_stepping": info.get("stepping"), "isa": {f: f in flags for f in ISA_FLAGS},
            "affinity": sorted(os.sched_getaffinity(0))}


def pin_threads(threads: int | None) -> None:
    """Run on the first ``threads`` CPUs (all of this process's threads, whatever the
    framework); at one thread also XLA's intra-op pool.  Call before importing JAX."""
    if not threads:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs are available to this process")
    os.sched_setaffinity(0, set(cpus[:threads]))
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = " ".join([flags, "--xla_cpu_multi_thread_eigen=false"]).strip()


def time_cell(mode, compute, tokens, out_f, in_f, rank, rounds, steps):
    import jax
    import numpy as np
    import torch

    w = _weight(out_f, in_f)
    tdt = getattr(torch, compute)
    x_np = np.random.default_rng(1).standard_normal((tokens, in_f)).astype(np.float32)
    xt = torch.from_numpy(x_np).to(tdt)
    q, fwd, jstep = _jax_fns(mode, w, compute, rank)
    xj = jax.numpy.asarray(x_np).astype(compute)
    train, evl = _bnb_layer(mode, w, compute).train(), _bnb_layer(mode, w, compute).eval()
    ours = _dualprec_torch_layer(mode, w, compute).eval()
    if mode == "int8":
        train = evl  # bitsandbytes' int8 inference layer has one CPU path

    def no_grad(layer):
        def run():
            with torch.no_grad():
                return layer(xt)
        return run

    steps_ = {"bnb-train": no_grad(train), "torch": no_grad(ours), "jax": lambda: fwd(xj, q)}
    if mode != "int8":
        steps_["bnb-eval"] = no_grad(evl)
    if jstep is not None:
        import jax.numpy as jnp

        a, b = _lora(in_f, out_f, rank, tdt)
        ab = (jnp.asarray(a.detach().float().numpy().T).astype(compute),
              jnp.asarray(b.detach().float().numpy().T).astype(compute))
        train_grad = _bnb_layer(mode, w, compute).train()
        ours_grad = _dualprec_torch_layer(mode, w, compute).train()

        xg = xt.detach().clone().requires_grad_()

        def torch_step(layer):
            def run():
                a.grad = b.grad = xg.grad = None
                y = (layer(xg) + (xg @ a.t() @ b.t()) * 2.0).float()
                (y * y).sum().backward()
                return b.grad
            return run

        steps_["bnb-qlora-step"] = torch_step(train_grad)
        steps_["torch-qlora-step"] = torch_step(ours_grad)
        steps_["jax-qlora-step"] = lambda: jstep(ab, xj, q)

    def sync(r):
        return jax.block_until_ready(r) if not isinstance(r, torch.Tensor) else r

    timings = harness.time_interleaved(steps_, warmup=2, rounds=rounds, steps_per_round=steps, sync=sync)
    stats = {k: t.stats for k, t in timings.items()}
    rows = []
    for name, st in stats.items():
        base = "bnb-qlora-step" if name.endswith("qlora-step") else "bnb-train"
        row = {"mode": mode, "compute": compute, "tokens": tokens, "out": out_f, "in": in_f, "impl": name,
               "step_time": st.to_dict(), "first_call_s": timings[name].first_call_s,
               "ratio_vs_bnb": st.median / stats[base].median if base in stats and name != base else None,
               "ratio_vs_bnb_eval": (st.median / stats["bnb-eval"].median
                                     if "bnb-eval" in stats and not name.endswith("qlora-step") else None)}
        rows.append(row)
    gc.collect()
    return rows


# ----- memory: resident-set growth while holding quantized layers, one process per mode ----


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(backend, mode, layers, width):
    """Resident bytes gained while holding `layers` quantized width x width layers (each
    quantized from a float32 weight that is freed right after)."""

    held = []
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        from dualprec_jax import quant

        spec = quant.QuantSpec(mode)
        fn = jax.jit(quant._quantize_weight, static_argnums=1)
        jax.block_until_ready(fn(jnp.asarray(_weight(width, width, 99)), spec))  # compile, warm the allocator
        _trim()
        rss0 = _rss_bytes()
        for i in range(layers):
            held.append(jax.block_until_ready(fn(jnp.asarray(_weight(width, width, i)), spec)))
    else:

        compute = "float16" if mode == "int8" else "float32"
        _dualprec_torch_layer(mode, _weight(width, width, 99), compute)
        _trim()
        rss0 = _rss_bytes()
        for i in range(layers):
            held.append(_dualprec_torch_layer(mode, _weight(width, width, i), compute))
    _trim()
    rss1 = _rss_bytes()
    del held
    _trim()
    freed = rss1 - _rss_bytes()
    n = layers * width * width
    return {"backend": backend, "mode": mode, "layers": layers, "width": width, "params": n,
            "rss_growth_bytes": rss1 - rss0, "rss_freed_bytes": freed, "bits_per_param": 8 * freed / n,
            "float32_bits": 32}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _forward_peak_child(backend, mode, compute, tokens, out_f, in_f):
    """The peak resident bytes a forward adds on top of one built layer: VmHWM (reset through
    /proc/self/clear_refs after a warm-up call) minus the resident set before the calls.
    What each path's temporaries (a dequantized weight, whole or in chunks) cost, measured."""
    import numpy as np

    w = _weight(out_f, in_f)
    x = np.random.default_rng(1).standard_normal((tokens, in_f)).astype(np.float32)
    live = None
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        from dualprec_jax import quant

        spec = quant.QuantSpec(mode, compute_dtype=compute)
        q = jax.block_until_ready(jax.jit(quant._quantize_weight, static_argnums=1)(jnp.asarray(w), spec))
        xj = jnp.asarray(x).astype(compute)
        fwd = jax.jit(lambda x, q: quant.quantized_linear(x, q, spec, out_f))

        def run():
            jax.block_until_ready(fwd(xj, q))
    else:
        import torch

        layer = (_bnb_layer(mode, w, compute).train() if backend == "bnb"
                 else _dualprec_torch_layer(mode, w, compute).eval())
        xt = torch.from_numpy(x).to(getattr(torch, compute))

        def run():
            with torch.no_grad():
                layer(xt)
    del w
    run()  # compile / first call
    _trim()
    if backend == "jax":
        live = sum(a.nbytes for a in jax.live_arrays())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    rss0 = _status_bytes("VmRSS")
    for _ in range(3):
        run()
    peak = _status_bytes("VmHWM") - rss0
    return {"backend": backend, "mode": mode, "compute": compute, "tokens": tokens, "out": out_f, "in": in_f,
            "forward_peak_extra_bytes": peak, "rss_before_bytes": rss0, "jax_live_buffer_bytes": live,
            "float32_weight_bytes": out_f * in_f * 4}


def _trim() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS follows what is held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _child(call: str, timeout: int = 900):
    code = (f"import json, sys; sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}]; "
            f"from bench.bench_quant_speed import *; from bench.bench_quant_speed import _memory_child, "
            f"_forward_peak_child; print(json.dumps({call}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def forward_peaks(modes, computes, tokens_list, out_f, in_f):
    """One fresh process per backend, mode, compute dtype and token count (see
    `_forward_peak_child`)."""
    rows = []
    for mode in modes:
        for compute in computes:
            if mode == "int8" and compute == "float32":
                compute = "float16"
            for tokens in tokens_list:
                for backend in ("jax", "torch", "bnb"):
                    row = _child(f"_forward_peak_child({backend!r}, {mode!r}, {compute!r}, {tokens}, {out_f}, {in_f})")
                    row.update(backend=backend, mode=mode, compute=compute, tokens=tokens)
                    rows.append(row)
                    if "error" in row:
                        print(f"forward peak {backend:5s} {mode:7s} {compute} t={tokens} failed: {row['error']}", flush=True)
                        continue
                    live = row["jax_live_buffer_bytes"]
                    print(f"forward peak {backend:5s} {mode:7s} {compute:8s} t={tokens:<4d} "
                          f"+{row['forward_peak_extra_bytes'] / 2**20:7.1f} MiB over the built layer"
                          + ("" if live is None else f" (JAX live buffers {live / 2**20:.1f} MiB)"), flush=True)
    return rows


def memory(modes, layers, width):
    rows = []
    for backend in ("jax", "torch"):
        for mode in modes:
            code = (f"import json, sys; sys.path[:0] = [{str(Path(__file__).resolve().parents[1])!r}]; "
                    f"from bench.bench_quant_speed import _memory_child; "
                    f"print(json.dumps(_memory_child({backend!r}, {mode!r}, {layers}, {width})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
            if out.returncode:
                rows.append({"backend": backend, "mode": mode, "error": out.stderr.strip().splitlines()[-1:]})
                print(f"memory {backend:5s} {mode:7s} failed: {rows[-1]['error']}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"memory {backend:5s} {mode:7s} {row['bits_per_param']:6.3f} bits/param held (RSS freed when the "
                  f"layers are dropped: {row['rss_freed_bytes'] / 2**20:.1f} MiB for {row['params'] / 1e6:.0f}M "
                  f"params; RSS growth while building {row['rss_growth_bytes'] / 2**20:.1f} MiB)", flush=True)
    return rows


def _ms(st: dict) -> str:
    return f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f})"


def markdown_table(paths) -> str:
    """The speed rows of result files as one markdown table: per cell, JAX / torch /
    bitsandbytes medians in ms with (min-max), the rounds, and the ratios of the medians
    (against bitsandbytes' exact train-mode path, and its eval path where it has one)."""
    lines = ["| threads | mode | compute | out x in | tokens | row | JAX ms | torch ms | bnb ms | bnb eval ms "
             "| n | JAX / bnb | JAX / bnb eval | torch / bnb |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(Path(path).read_text())
        threads = data["environment"].get("threads", data["environment"].get("torch_threads"))
        cells = {}
        for r in data["rows"]:
            kind = "step" if r["impl"].endswith("qlora-step") else "forward"
            key = (r["mode"], r["compute"], f"{r['out']}x{r['in']}", r["tokens"], kind)
            cells.setdefault(key, {})[r["impl"].replace("-qlora-step", "")] = r["step_time"]
        for (mode, compute, shape, tokens, kind), st in cells.items():
            base = st.get("bnb" if kind == "step" else "bnb-train")
            evl = st.get("bnb-eval")

            def ratio(name, against):
                return "-" if name not in st or against is None else f"{st[name]['median'] / against['median']:.2f}"

            lines.append(f"| {threads} | {mode} | {compute} | {shape} | {tokens} | {'LoRA step' if kind == 'step' else 'forward'} "
                         f"| {_ms(st['jax']) if 'jax' in st else '-'} | {_ms(st['torch']) if 'torch' in st else '-'} "
                         f"| {_ms(base) if base else '-'} | {_ms(evl) if evl else '-'} | {(base or st['jax'])['n']} "
                         f"| {ratio('jax', base)} | {ratio('jax', evl)} | {ratio('torch', base)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="nf4,nf4-dq,fp4,fp4-dq,int8")
    ap.add_argument("--tokens", default="1,64,512")
    ap.add_argument("--computes", default="float32,bfloat16")
    ap.add_argument("--shapes", default="8192x2048,2048x8192",
                    help="out x in (torch's weight shape): 8192x2048 is 2048 -> 8192, 2048x8192 is 8192 -> 2048")
    ap.add_argument("--rank", type=int, default=16, help="QLoRA adapter rank (0: no train-step rows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per round")
    ap.add_argument("--threads", type=int, default=None,
                    help="pin the process to the first N CPUs (torch threads N; XLA single-threaded at 1)")
    ap.add_argument("--memory", action="store_true", help="also measure resident memory per mode")
    ap.add_argument("--memory-only", action="store_true", help="only the memory rows")
    ap.add_argument("--memory-layers", type=int, default=12)
    ap.add_argument("--peak-tokens", default="1,64", help="token counts of the forward-peak memory rows")
    ap.add_argument("--memory-width", type=int, default=2048)
    ap.add_argument("--name", default="quant-speed")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of result files and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(args.table), end="")
        return
    pin_threads(args.threads)
    env = harness.cpu_environment(args.threads)
    env.update(cpu_identity(), threads=args.threads or len(os.sched_getaffinity(0)))
    path = harness.results_path(args.name, env, args.out_dir)
    result = {"name": args.name, "environment": env, "rows": [], "forward_peak": None, "memory": None}

    def flush():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")

    modes = [m for m in args.modes.split(",") if m]
    for shape in ([] if args.memory_only else args.shapes.split(",")):
        out_f, in_f = (int(s) for s in shape.split("x"))
        for mode in modes:
            computes = args.computes.split(",")
            if mode == "int8":  # LLM.int8 runs on half-precision activations (the Policy refuses float32)
                computes = list(dict.fromkeys("float16" if c == "float32" else c for c in computes))
            for compute in computes:
                for tokens in (int(t) for t in args.tokens.split(",")):
                    rows = time_cell(mode, compute, tokens, out_f, in_f, args.rank, args.rounds, args.steps)
                    result["rows"] += rows
                    result["environment"]["load_average_end"] = os.getloadavg()
                    flush()
                    for r in rows:
                        st = r["step_time"]
                        ratio = "" if r["ratio_vs_bnb"] is None else f" x{r['ratio_vs_bnb']:.2f} vs bnb"
                        ratio += "" if r["ratio_vs_bnb_eval"] is None else f", x{r['ratio_vs_bnb_eval']:.2f} vs eval"
                        print(f"{mode:7s} {compute:8s} {shape:9s} t={tokens:<4d} {r['impl']:17s} "
                              f"{st['median'] * 1e3:8.2f} ms [{st['min'] * 1e3:.2f}-{st['max'] * 1e3:.2f}]{ratio}",
                              flush=True)
    if args.memory or args.memory_only:
        out_f, in_f = (int(v) for v in args.shapes.split(",")[0].split("x"))
        result["forward_peak"] = forward_peaks(modes, args.computes.split(","),
                                               [int(t) for t in args.peak_tokens.split(",")], out_f, in_f)
        flush()
        result["memory"] = memory(modes, args.memory_layers, args.memory_width)
        flush()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
