"""Quantized weights: bytes per parameter of a linear stack in JAX (dualprec_jax.quant) and
torch (bitsandbytes Linear4bit / Linear8bitLt) against theory, and CPU forward speed of JAX's
dequantize-and-matmul against bitsandbytes' CPU Linear4bit forward (same shapes, one run).

    python bench/bench_quant_memory.py [--params 100e6] [--width 2048] [--quick]

Memory is what each backend holds for the quantized weights (every array a layer keeps for
them: codes, absmax, nested absmax and offset, bitsandbytes' code tables), divided by the
parameter count.  Theory: 4 bits + one float32 absmax per 64 values = 4.5 bits; double
quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits; int8: 8 bits + one float32 per row.
Writes bench/results/<date>-<machine>-quant.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dualprec.dtypes import dtype_bits  # noqa: E402
from dualprec_jax import quant  # noqa: E402

MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
BLOCK = 64


def theory_bits(mode: str, width: int) -> float:
    if mode == "int8":
        return 8 + 32 / width
    if mode.endswith("-dq"):
        return 4 + 8 / BLOCK + 32 / (BLOCK * 256)
    return 4 + 32 / BLOCK


def _weight(rng, width):
    return (rng.standard_normal((width, width), np.float32) / np.sqrt(width)).astype(np.float32)


def jax_bytes(mode: str, layers: int, width: int) -> int:
    spec = quant.QuantSpec(mode, compute_dtype="bfloat16" if mode == "int8" else "float32")
    rng = np.random.default_rng(0)
    fn = jax.jit(quant._quantize_weight, static_argnums=1)
    total = 0
    for _ in range(layers):
        q = fn(jnp.asarray(_weight(rng, width)), spec)
        total += sum(int(a.nbytes) for a in jax.tree.leaves(q))
        del q
    return total


def torch_bytes(mode: str, layers: int, width: int) -> int | None:
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(layers):
        if mode == "int8":
            layer = bnb.nn.Linear8bitLt(width, width, bias=False, has_fp16_weights=False, threshold=6.0)
        else:
            layer = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=torch.float32,
                                      compress_statistics=mode.endswith("-dq"), quant_type=mode[:3])
        layer.weight.data = torch.from_numpy(_weight(rng, width))
        layer = layer.to("cpu")
        tensors = {id(t): t for t in _bnb_weight_tensors(layer)}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del layer
    return total


def _bnb_weight_tensors(layer):
    w = layer.weight
    yield w.data
    if hasattr(w, "SCB") and w.SCB is not None:
        yield w.SCB
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        yield qs.absmax
        yield qs.code
        if qs.nested:
            yield qs.offset
            yield qs.state2.absmax
            yield qs.state2.code


def memory(params: float, width: int) -> dict:
    layers = max(1, round(params / (width * width)))
    n = layers * width * width
    rows = []
    for mode in MODES:
        t0 = time.perf_counter()
        jb = jax_bytes(mode, layers, width)
        tb = torch_bytes(mode, layers, width)
        theory = theory_bits(mode, width)
        row = {"mode": mode, "params": n, "theory_bits": theory,
               "jax_bits": 8 * jb / n, "jax_vs_theory": 8 * jb / n / theory - 1,
               "torch_bits": None if tb is None else 8 * tb / n,
               "torch_vs_theory": None if tb is None else 8 * tb / n / theory - 1,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{mode:8s} theory {theory:6.3f} bits  jax {row['jax_bits']:6.3f} ({row['jax_vs_theory']:+.3%})"
              + ("" if tb is None else f"  torch {row['torch_bits']:6.3f} ({row['torch_vs_theory']:+.3%})"),
              flush=True)
    unquantized = {name: dtype_bits(name) for name in ("float32", "bfloat16")}
    return {"layers": layers, "width": width, "params": n, "unquantized_bits": unquantized,
            "rows": rows}


def _median_time(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bnb_layer(w, compute):
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=getattr(torch, compute),
                              compress_statistics=False, quant_type="nf4")
    layer.weight.data = torch.from_numpy(w)
    return layer.to("cpu")


def speed(in_features: int, out_features: int, tokens_list, rounds: int) -> list[dict]:
    """Forward time of one nf4 layer.  bitsandbytes in train mode dequantizes and calls
    linear (its generic path, bit-exact); in eval mode without grad it repacks the weight once
    for a fused CPU kernel (AVX512-BF16 where the CPU has it).  Both are timed, each on its
    own layer; JAX is one jit of dequantize-then-dot."""
    import torch

    rng = np.random.default_rng(0)
    w = _weight(rng, max(in_features, out_features))[:out_features, :in_features].copy()
    q = quant.quantize_4bit(jnp.asarray(w), "nf4", BLOCK)
    results = []
    for compute in ("float32", "bfloat16"):
        spec = quant.QuantSpec("nf4", compute_dtype=compute)
        fwd = jax.jit(lambda x, q, spec=spec: quant.quantized_linear(x, q, spec, out_features))
        layers = {"train": _bnb_layer(w, compute).train(), "eval": _bnb_layer(w, compute).eval()}
        for tokens in tokens_list:
            x = rng.standard_normal((tokens, in_features)).astype(np.float32)
            xj = jnp.asarray(x).astype(compute)
            xt = torch.from_numpy(x).to(getattr(torch, compute))
            fwd(xj, q).block_until_ready()
            with torch.no_grad():
                for layer in layers.values():
                    layer(xt)  # warm-up (eval repacks the weight once for its CPU kernel)
            # Alternate JAX and bitsandbytes rounds so that load on the machine hits both.
            times = {"jax": [], "train": [], "eval": []}
            for _ in range(rounds):
                times["jax"].append(_median_time(lambda: fwd(xj, q).block_until_ready(), 3))
                with torch.no_grad():
                    for name, layer in layers.items():
                        times[name].append(_median_time(lambda: layer(xt), 3))
            t = {k: statistics.median(v) for k, v in times.items()}
            row = {"compute": compute, "tokens": tokens, "in": in_features, "out": out_features,
                   "jax_s": t["jax"], "bnb_train_s": t["train"], "bnb_eval_s": t["eval"],
                   "jax_over_bnb_train": t["jax"] / t["train"], "jax_over_bnb_eval": t["jax"] / t["eval"]}
            results.append(row)
            print(f"speed {compute:8s} tokens {tokens:5d}: jax {row['jax_s'] * 1e3:8.2f} ms  bnb train "
                  f"{row['bnb_train_s'] * 1e3:8.2f} ms  eval {row['bnb_eval_s'] * 1e3:8.2f} ms  "
                  f"ratio jax/bnb {row['jax_over_bnb_train']:.2f} / {row['jax_over_bnb_eval']:.2f}", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--speed-in", type=int, default=2048)
    ap.add_argument("--speed-out", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="4M parameters, small speed shapes, 3 rounds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.width, args.speed_in, args.speed_out, args.rounds = 4e6, 1024, 512, 1024, 3
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {"bench": "quant-memory-speed", "date": datetime.date.today().isoformat(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average": load,
              "jax": jax.__version__, "memory": memory(args.params, args.width)}
    try:
        import bitsandbytes
        import torch

        result["bitsandbytes"], result["torch"] = bitsandbytes.__version__, torch.__version__
        result["torch_threads"] = torch.get_num_threads()
        result["speed"] = speed(args.speed_in, args.speed_out, (1, 64), args.rounds)
    except ImportError:
        result["speed"] = None
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                          f"{result['date']}-vm-quant{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
