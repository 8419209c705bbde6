"""Kernel configurations: the same correct frameworks computing other legitimate bits.

Every CPU (AVX512, AVX2, SSE), every library (oneDNN, MKL, Eigen) and every GPU (cuBLAS,
split-K) sums a GEMM's or a convolution's terms in its own order.  A verdict of the suite
must not depend on which one ran, so the suite is run here under several kernel choices that
one machine can make:

* knobs of the frameworks themselves (``CONFIGS``): oneDNN's ISA cap (moves torch's
  convolution bits), MKL's instruction cap (moves torch's float32 GEMM bits), ATen's CPU
  capability (moves torch's vectorised reductions: layer_norm), thread counts and XLA's ISA
  cap and Eigen threading (checked on this project's CI machine: these did not move JAX's
  bits, so they are kept for machines where they do);
* a reordering mode of our own, ``DUALPREC_CONFORMANCE_REORDER=CHUNK``: the torch side
  computes every linear, matmul and convolution with its reduction split into chunks of
  ``CHUNK`` terms whose partial sums are added last chunk first, in the accumulation dtype
  (float32; float64 for float64 operands), with the operands cast as CUDA autocast casts
  them and one rounding to the output dtype: what another kernel (or a GPU's split-K)
  legitimately computes.

``python -m conformance.kernels`` runs the default matrix (and optionally the mutants) under
every configuration, each in a fresh process, and prints per configuration the pass/fail
counts, the kill rate, the widest output line and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REORDER_ENV = "DUALPREC_CONFORMANCE_REORDER"

#: name -> environment.  "default" is the process as it is.
CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
    "sse-1thread": {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                    "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    # (--xla_cpu_max_isa=SSE4_2 makes XLA 0.10 fail to compile half-precision
                    # converts: "Failed to materialize symbols: wrapped_convert")
                    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "reorder-7": {REORDER_ENV: "7"},
    # (every library capped together, as on a real AVX2 CPU: oneDNN capped at AVX2 while ATen
    # runs AVX512 makes bitsandbytes' CPU int8 matmul wrong by up to 133%)
    "reorder-3-avx2": {REORDER_ENV: "3", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                       "ATEN_CPU_CAPABILITY": "avx2"},
}


# ---------------------------------------------------------------- the torch reordering mode
def _chunked_sum(parts):
    total = None
    for p in reversed(parts):  # last chunk first
        total = p if total is None else total + p
    return total


def _splits(k: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, k)) for i in range(0, k, chunk)]


def _install_torch(chunk: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    lower = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch._C.TensorBase.matmul, torch.Tensor.matmul,
             torch.mm, torch.bmm, F.conv1d, F.conv2d}

    def op_dtype(tensors):
        floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floats:
            return None
        dev = floats[0].device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        out = floats[0].dtype
        for t in floats[1:]:
            out = torch.promote_types(out, t.dtype)
        return out

    def wide(dt):
        return torch.float64 if dt == torch.float64 else torch.float32

    class Reorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func not in lower or kwargs.get("out") is not None:
                return func(*args, **kwargs)
            dt = op_dtype(list(args) + list(kwargs.values()))
            if dt is None or not dt.is_floating_point:
                return func(*args, **kwargs)
            dev = next(a for a in args if isinstance(a, torch.Tensor)).device.type
            acc = wide(dt)
            with torch.autocast(dev, enabled=False):
                if func is F.linear:
                    x, w = args[0], args[1]
                    b = args[2] if len(args) > 2 else kwargs.get("bias")
                    xs, ws = x.to(dt).to(acc), w.to(dt).to(acc)
                    parts = [xs[..., s] @ ws[:, s].T for s in _splits(xs.shape[-1], chunk)]
                    y = _chunked_sum(parts)
                    if b is not None:
                        y = y + b.to(dt).to(acc)
                    return y.to(dt)
                if func in (F.conv1d, F.conv2d):
                    x, w = args[0], args[1]
                    b = args[2] if len(args) > 2 else kwargs.get("bias")
                    rest = dict(zip(("stride", "padding", "dilation", "groups"), args[3:]), **{
                        k: v for k, v in kwargs.items() if k != "bias"})
                    if rest.get("groups", 1) != 1:
                        return func(*args, **kwargs)
                    xs, ws = x.to(dt).to(acc), w.to(dt).to(acc)
                    parts = [func(xs[:, s], ws[:, s], None, **rest) for s in _splits(xs.shape[1], chunk)]
                    y = _chunked_sum(parts)
                    if b is not None:
                        y = y + b.to(dt).to(acc).reshape(1, -1, *([1] * (y.ndim - 2)))
                    return y.to(dt)
                a, b = args[0], args[1]
                if a.ndim < 2 or b.ndim < 2:
                    return func(*args, **kwargs)
                As, Bs = a.to(dt).to(acc), b.to(dt).to(acc)
                parts = [torch.matmul(As[..., s], Bs[..., s, :]) for s in _splits(As.shape[-1], chunk)]
                return _chunked_sum(parts).to(dt)

    Reorder().__enter__()  # for the rest of the process (a conformance run in its own process)


_installed = False


def install_from_env() -> bool:
    """Turn the reordering mode on when ``DUALPREC_CONFORMANCE_REORDER`` asks for it (once
    per process); returns whether it is on."""
    global _installed
    value = os.environ.get(REORDER_ENV, "").strip()
    if not value:
        return False
    if not _installed:
        try:
            chunk = int(value)
        except ValueError:
            raise ValueError(f"{REORDER_ENV}={value!r}: expected a chunk length (an integer >= 1), e.g. 7") from None
        if chunk < 1:
            raise ValueError(f"{REORDER_ENV}={value!r}: the chunk length must be >= 1")
        _install_torch(chunk)
        _installed = True
    return True


# ---------------------------------------------------------------- running the matrix per config
def run_config(name: str, extra: list[str] | None = None, mutants: bool = False, timeout: float = 1800) -> dict:
    """The default matrix (or the mutants) under one configuration, in a fresh process."""
    env = dict(os.environ, **CONFIGS[name], COLUMNS="80")
    if "XLA_FLAGS" in CONFIGS[name] and os.environ.get("XLA_FLAGS"):
        env["XLA_FLAGS"] = os.environ["XLA_FLAGS"] + " " + CONFIGS[name]["XLA_FLAGS"]
    cmd = ([sys.executable, "-m", "conformance.mutants"] if mutants else
           [sys.executable, "-m", "conformance", "--format", "json"]) + list(extra or [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    result = {"config": name, "env": CONFIGS[name], "rc": out.returncode, "wall_s": round(wall, 1)}
    if mutants:
        lines = out.stdout.splitlines()
        result["kill_line"] = next((ln for ln in lines if ln.startswith("kill rate")), "")
        result["survived"] = [ln.split()[1] for ln in lines if ln.startswith("SURVIVED")]
        result["unmutated"] = next((ln for ln in lines if ln.startswith("unmutated")), "")
    else:
        from .records import loads

        recs = loads(out.stdout) if out.stdout.strip().startswith("[") else []
        result.update({s: sum(r.status == s for r in recs) for s in ("pass", "fail", "error", "skip")})
        result["failures"] = [f"{r.policy}/{r.model}/{r.check}: {r.reason}" for r in recs if r.failed][:10]
    if out.returncode not in (0, 1):
        result["stderr"] = out.stderr[-2000:]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.kernels",
                                description="Run the default matrix under several kernel configurations.")
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="default: all")
    p.add_argument("--mutants", action="store_true", help="run the mutation test per configuration too")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    results = []
    for name in args.config or list(CONFIGS):
        r = run_config(name)
        print(f"{name:15s} rc={r['rc']} pass={r.get('pass')} fail={r.get('fail')} error={r.get('error')} "
              f"skip={r.get('skip')} {r['wall_s']:.0f} s", flush=True)
        for f in r.get("failures", []):
            print(f"    {f[:200]}")
        if args.mutants:
            m = run_config(name, mutants=True, timeout=3600)
            r["mutants"] = m
            print(f"{'':15s} mutants: {m['kill_line']} {m['unmutated']}"
                  + (f" SURVIVED: {', '.join(m['survived'])}" if m["survived"] else ""), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["rc"] == 0 and (not args.mutants or r["mutants"]["rc"] == 0) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
