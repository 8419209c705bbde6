"""The cost of `dualprec_jax.autocast` on a model that runs its layers with ``lax.scan``,
against the same arithmetic written by hand, in the same run:

- ``autocast``: ``jax.grad`` of the plain float32 model run under
  ``autocast(loss, "bf16-mixed")`` (pre-norm residual MLP blocks written with jnp: LayerNorm
  from mean/var/rsqrt, ``x @ w1``, ``jax.nn.gelu``, ``@ w2``; the layers' parameters stacked
  and scanned over);
- ``hand``: the table's arithmetic written out by hand (matmuls on bfloat16 operands
  accumulated in float32 and rounded once, GELU by torch's tanh formula in float32 rounded
  once, `dualprec_jax.ops.torch_activation`), the same scan: the same arithmetic, so the
  ratio is the transformation's cost, not the table's;
- ``plain_bf16``: the model with its parameters and input cast to bfloat16 once, every op in
  plain JAX bfloat16 (what a user gets without a table; other arithmetic, for scale).

Step time: ``rounds`` interleaved rounds of ``steps`` steps per variant (variants take turns,
so load drift lands on each); per round the median step of each variant and the ratio
autocast/hand of that round; reported: median and min-max over rounds.  Tracing: the time of
``jax.jit(step).trace`` + ``.lower`` for a model of ``--trace-layers`` layers, scanned and
unrolled (a Python loop over layers), and of ``.compile`` for the scanned one; median and
min-max of ``--trace-repeats`` interleaved repeats and of their per-repeat ratios.
Writes bench/results/<date>-<machine>-jax-autocast-scan.json with the CPU model.

    python bench/bench_jax_autocast_scan.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench.harness import environment, results_path  # noqa: E402
from dualprec_jax import autocast  # noqa: E402
from dualprec_jax.ops import torch_activation  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16


def init(layers, d_model, d_hidden, key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (layers, d_model, d_hidden), F32) * d_model ** -0.5,
            "w2": jax.random.normal(k2, (layers, d_hidden, d_model), F32) * d_hidden ** -0.5,
            "g": jnp.ones((layers, d_model), F32)}


def _layer_plain(x, p):
    mu = jnp.mean(x, -1, keepdims=True)
    h = (x - mu) * lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-5) * p["g"]
    return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def _mm(a, w):  # the lower list: bf16 operands, float32 accumulation, one rounding
    return lax.dot_general(a.astype(BF16), w.astype(BF16), (((a.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=F32).astype(BF16)


def _gelu_tanh(x):  # an unlisted activation: torch's formula in float32, one rounding
    return torch_activation("gelu", jax.nn.gelu, x.astype(F32)).astype(x.dtype)


def _layer_hand(x, p):
    mu = jnp.mean(x, -1, keepdims=True)
    h = (x - mu) * lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-5) * p["g"]
    return x + _mm(_gelu_tanh(_mm(h, p["w1"])), p["w2"])


def _run(layer, params, x, scan):
    if scan:
        return lax.scan(lambda c, p: (layer(c, p), None), x, params)[0]
    for i in range(params["w1"].shape[0]):
        x = layer(x, jax.tree.map(lambda a, i=i: a[i], params))
    return x


def _loss(y):
    return jnp.mean(jnp.square(y.astype(F32)))


def steps_for(scan=True):
    """name -> step(params, x) (SGD on the gradient: the same update in every variant)."""
    def sgd(grad_fn):
        def step(params, x):
            g = grad_fn(params, x)
            return jax.tree.map(lambda a, b: a - 1e-3 * b.astype(a.dtype), params, g)
        return step

    table = autocast(lambda p, x: _loss(_run(_layer_plain, p, x, scan)), "bf16-mixed")
    hand = lambda p, x: _loss(_run(_layer_hand, p, x, scan))  # noqa: E731
    bf16 = lambda p, x: _loss(_run(_layer_plain, jax.tree.map(lambda a: a.astype(BF16), p), x.astype(BF16),  # noqa: E731
                                   scan))
    return {"autocast": sgd(jax.grad(table)), "hand": sgd(jax.grad(hand)), "plain_bf16": sgd(jax.grad(bf16))}


def time_steps(params, x, rounds, steps):
    fns = {k: jax.jit(f) for k, f in steps_for(scan=True).items()}
    for f in fns.values():  # compile and warm up
        jax.block_until_ready(f(params, x))
        jax.block_until_ready(f(params, x))
    per_round = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(params, x))
                times.append(time.perf_counter() - t0)
            per_round[k].append(statistics.median(times))
    ratios = {f"{k}/hand": [a / b for a, b in zip(per_round[k], per_round["hand"])] for k in fns if k != "hand"}
    return per_round, ratios


def _specs(layers, d_model, d_hidden, tokens):
    params = jax.eval_shape(lambda: init(layers, d_model, d_hidden, jax.random.key(0)))
    return params, jax.ShapeDtypeStruct((tokens, d_model), F32)


def time_tracing(layers, d_model, d_hidden, tokens, repeats):
    """Seconds of ``jit(step).trace(...).lower()`` (and ``.compile()`` for the scanned model;
    the unrolled one takes minutes to compile on a small CPU) of a ``layers``-layer model.
    Each repeat builds new step functions (a jitted function reuses its trace); an untimed
    trace of a 2-layer model of each variant first pays JAX's one-time costs (its own jitted
    helpers' traces) outside the timing; the variants take turns."""
    small = _specs(2, d_model, d_hidden, tokens)
    for scan in (True, False):
        for name in ("autocast", "hand"):
            jax.jit(steps_for(scan)[name]).trace(*small).lower()
    specs = _specs(layers, d_model, d_hidden, tokens)
    samples = {}
    for _ in range(repeats):
        for scan in (True, False):
            for name in ("autocast", "hand"):
                step = steps_for(scan)[name]  # new function objects: nothing cached
                key = f"{'scan' if scan else 'unrolled'}/{name}"
                t0 = time.perf_counter()
                lowered = jax.jit(step).trace(*specs).lower()
                t1 = time.perf_counter()
                samples.setdefault(f"{key}/trace_lower_s", []).append(t1 - t0)
                if scan:
                    lowered.compile()
                    samples.setdefault(f"{key}/compile_s", []).append(time.perf_counter() - t1)
    out = {k: _summary(v) | {"all": v} for k, v in samples.items()}
    for kind, what in (("scan", "trace_lower_s"), ("scan", "compile_s"), ("unrolled", "trace_lower_s")):
        ratios = [a / h for a, h in zip(samples[f"{kind}/autocast/{what}"], samples[f"{kind}/hand/{what}"])]
        out[f"{kind}/autocast_over_hand/{what}"] = _summary(ratios) | {"all": ratios}
    return out


def hlo_ops(params, x):
    """Instruction counts by opcode in the optimized (compiled) HLO of each step."""
    import collections
    import re

    opcode = re.compile(r"=\s+(?:\(.*?\)|\S+)\s+([a-z][\w\-]*)\(")
    counts = {}
    for name, step in steps_for(scan=True).items():
        text = jax.jit(step).lower(params, x).compile().as_text()
        counts[name] = dict(sorted(collections.Counter(
            m.group(1) for line in text.splitlines() for m in [opcode.search(line)] if m).items()))
    return counts


def agreement(params, x) -> dict:
    """Per parameter: (fraction of bitwise-equal elements, max abs difference) of the
    parameters after one autocast step and one hand-written step."""
    fns = steps_for(scan=True)
    a, h = jax.jit(fns["autocast"])(params, x), jax.jit(fns["hand"])(params, x)
    return {k: (float(jnp.mean(a[k] == h[k])), float(jnp.max(jnp.abs(a[k] - h[k])))) for k in a}


def same_bits(params, x) -> bool:
    """Whether the autocast step and the hand-written one give bitwise-equal parameters."""
    return all(equal == 1.0 for equal, _ in agreement(params, x).values())


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--trace-layers", type=int, default=64)
    ap.add_argument("--trace-repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-steps", action="store_true")
    args = ap.parse_args(argv)

    env = environment()
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu_model"] = None
    import os

    env["load_average_start"] = os.getloadavg()
    result = {"bench": "jax-autocast-scan", "env": env, "config": vars(args)}
    params = init(args.layers, args.d_model, args.d_hidden, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.tokens, args.d_model), F32)
    result["autocast_vs_hand_equal_fraction_max_abs"] = agreement(params, x)
    result["hlo_ops"] = hlo_ops(params, x)
    result["hlo_ops_autocast_equals_hand"] = result["hlo_ops"]["autocast"] == result["hlo_ops"]["hand"]
    if not args.skip_steps:
        per_round, ratios = time_steps(params, x, args.rounds, args.steps)
        result["step_s"] = {k: _summary(v) | {"rounds": v} for k, v in per_round.items()}
        result["step_ratio"] = {k: _summary(v) | {"rounds": v} for k, v in ratios.items()}
    result["tracing"] = time_tracing(args.trace_layers, args.d_model, args.d_hidden, args.tokens, args.trace_repeats)
    env["load_average_end"] = os.getloadavg()
    path = Path(args.out) if args.out else results_path("jax-autocast-scan", env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: {n: v["median"] for n, v in result["tracing"].items()} for k in ("tracing",)}, indent=1))
    print(json.dumps({k: result[k] for k in ("autocast_vs_hand_equal_fraction_max_abs", "hlo_ops_autocast_equals_hand")} | {
        k: {n: result[k][n]["median"] for n in result[k]} for k in ("step_s", "step_ratio") if k in result},
        indent=1, default=str))
    print("written", path)


if __name__ == "__main__":
    main()
