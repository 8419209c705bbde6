"""The cost of the one op-table path: a training step of residual MLP blocks (LayerNorm ->
Dense -> GELU -> Dense) under bf16-mixed, three ways, in the same run:

- ``one_path``: ``Precision.apply`` (the model traced under the whole op table,
  `dualprec_jax.autocast`, the linen interceptor inside for parameter dtypes and fused bias);
- ``interceptor``: the earlier path, the linen interceptor alone (``with prec.autocast():
  model.apply(...)``), which leaves jnp / jax.nn ops (here the GELU) in plain JAX dtypes;
- ``hand``: the model written with Flax's own ``dtype=`` knobs (no dualprec in the step).

Per variant: trace + lowering time (``jit(...).lower``), XLA compile time, and the step time
(best of ``repeats`` interleaved rounds of ``steps`` steps); ratios against ``hand`` and
``interceptor`` are computed in the same run.  Writes
bench/results/<date>-<machine>-jax-one-path.json.

    python bench/bench_jax_one_path.py            # CPU sizes
    python bench/bench_jax_one_path.py --gpu      # larger sizes (an accelerator)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dualprec_jax import Precision  # noqa: E402

CPU = dict(d_model=256, d_hidden=1024, blocks=2, tokens=512, steps=10, warmup=2, repeats=5)
GPU = dict(d_model=2048, d_hidden=8192, blocks=4, tokens=8192, steps=10, warmup=3, repeats=5)


class Blocks(nn.Module):
    d_model: int
    d_hidden: int
    blocks: int
    dtype: object = None  # the hand-written variant sets the compute dtype here

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln{i}")(x)
            h = nn.Dense(self.d_hidden, dtype=self.dtype, name=f"up{i}")(h)
            x = x + nn.Dense(self.d_model, dtype=self.dtype, name=f"down{i}")(nn.gelu(h))
        return x


def _loss(y):
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def variants(policy, d_model, d_hidden, blocks, tokens):
    prec = Precision(policy)
    plain = Blocks(d_model, d_hidden, blocks)
    hand = Blocks(d_model, d_hidden, blocks, dtype=prec.compute_dtype)
    x = jax.random.normal(jax.random.key(1), (tokens, d_model), jnp.float32)
    params = prec.init(plain, jax.random.key(0), x)["params"]
    tx = optax.adamw(1e-4)

    def forward_one_path(p, x):
        return prec.apply(plain, {"params": p}, x)

    def forward_interceptor(p, x):
        with prec.autocast():
            return prec.convert_output(plain.apply({"params": p}, x))

    def forward_hand(p, x):
        return hand.apply({"params": p}, x).astype(prec.output_dtype)

    def step_of(forward):
        def step(p, s, x):
            g = jax.grad(lambda q: _loss(forward(q, x)))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        return step

    return ({"hand": step_of(forward_hand), "interceptor": step_of(forward_interceptor),
             "one_path": step_of(forward_one_path)}, params, tx.init(params), x)


def measure(policy="bf16-mixed", d_model=256, d_hidden=1024, blocks=2, tokens=512, steps=10, warmup=2,
            repeats=5) -> dict:
    steps_, params, opt0, x = variants(policy, d_model, d_hidden, blocks, tokens)
    compiled, states, out = {}, {}, {}
    for name, fn in steps_.items():
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(params, opt0, x)
        t1 = time.perf_counter()
        compiled[name] = lowered.compile()
        t2 = time.perf_counter()
        p, s = params, opt0
        for _ in range(warmup):
            p, s = jax.block_until_ready(compiled[name](p, s, x))
        states[name] = (p, s)
        out[name] = {"trace_lower_s": t1 - t0, "compile_s": t2 - t1}
    times = {name: [] for name in steps_}
    cpu = {name: [] for name in steps_}
    for _ in range(repeats):
        for name in steps_:  # interleaved: drift and neighbours' load hit all alike
            p, s = states[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                p, s = compiled[name](p, s, x)
            jax.block_until_ready((p, s))
            times[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
            states[name] = (p, s)
    for name in steps_:
        out[name]["step_s"] = float(np.min(times[name]))
        out[name]["step_s_all"] = [float(t) for t in times[name]]
        # CPU seconds of this process per step (all threads): less sensitive than wall time
        # to other processes on a shared machine
        out[name]["step_cpu_s"] = float(np.median(cpu[name]))
    ratios = {}
    for key in ("step_s", "step_cpu_s", "trace_lower_s", "compile_s"):
        ratios[f"one_path_over_hand.{key}"] = out["one_path"][key] / out["hand"][key]
        ratios[f"one_path_over_interceptor.{key}"] = out["one_path"][key] / out["interceptor"][key]
    return {"policy": policy, "sizes": dict(d_model=d_model, d_hidden=d_hidden, blocks=blocks, tokens=tokens,
                                              steps=steps, warmup=warmup, repeats=repeats),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "variants": out, "ratios": ratios}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the larger sizes")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<machine>-jax-one-path.json)")
    args = ap.parse_args(argv)
    sizes = GPU if args.gpu else CPU
    runs = [measure(policy=p, **sizes) for p in ("bf16-mixed", "16-mixed")]
    result = {"bench": "jax-one-path", "date": datetime.date.today().isoformat(), "machine": platform.node(),
              "python": platform.python_version(), "runs": runs,
              "note": "step_s: best of `repeats` interleaved rounds (wall); step_cpu_s: median CPU time of "
                      "this process per step; trace_lower_s: jit(...).lower; compile_s: .compile()"}
    for r in runs:
        v = r["variants"]
        print(f"{r['policy']:11s} step CPU ms: hand {v['hand']['step_cpu_s'] * 1e3:.2f}  interceptor "
              f"{v['interceptor']['step_cpu_s'] * 1e3:.2f}  one_path {v['one_path']['step_cpu_s'] * 1e3:.2f}")
        print(f"{r['policy']:11s} step ms: hand {v['hand']['step_s'] * 1e3:.2f}  interceptor "
              f"{v['interceptor']['step_s'] * 1e3:.2f}  one_path {v['one_path']['step_s'] * 1e3:.2f} | trace+lower s: "
              f"{v['hand']['trace_lower_s']:.2f} / {v['interceptor']['trace_lower_s']:.2f} / "
              f"{v['one_path']['trace_lower_s']:.2f} | compile s: {v['hand']['compile_s']:.2f} / "
              f"{v['interceptor']['compile_s']:.2f} / {v['one_path']['compile_s']:.2f}")
        print("   ratios " + ", ".join(f"{k} {x:.3f}" for k, x in r["ratios"].items()))
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"{result['date']}-{platform.node()}-jax-one-path.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
