"""Training step speed of bf16-mixed through dualprec_jax.Precision against the same model
written by hand in Flax (dtype=bf16, param_dtype=float32), on the H200 reference workload: residual
blocks of LayerNorm -> Dense(d, 4d) -> GELU -> Dense(4d, d), AdamW, loss = mean(y^2).

``measure(...)`` is called by the lead's device script (full sizes, H200) and by
bench_jax_precision.py (tiny sizes, CPU); it needs no jmp (absent on the GPU machine).
TFLOP/s counts 6 x params x tokens per step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages, run from anywhere

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualprec_jax import Precision


class MLPStack(nn.Module):
    d_model: int
    d_hidden: int
    blocks: int
    dtype: object = None  # the hand-written variant sets bf16 here; Precision leaves it None

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            h = nn.LayerNorm(dtype=self.dtype, name=f"ln{i}")(x)
            h = nn.Dense(self.d_hidden, dtype=self.dtype, name=f"up{i}")(h)
            h = nn.Dense(self.d_model, dtype=self.dtype, name=f"down{i}")(nn.gelu(h))
            x = x + h
        return x


def _loss(y):
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def _steps(d_model, d_hidden, blocks, tokens, policy):
    prec = Precision(policy)
    x = jax.random.normal(jax.random.key(1), (tokens, d_model), jnp.float32)
    plain = MLPStack(d_model, d_hidden, blocks)
    hand_model = MLPStack(d_model, d_hidden, blocks, dtype=prec.compute_dtype)
    params = prec.init(plain, jax.random.key(0), x)["params"]
    tx = optax.adamw(1e-4)

    try:  # the jmp loop where jmp is installed (CPU bench); plain optax on the GPU machine
        import jmp
        ls0 = (jmp.DynamicLossScale(jnp.float32(prec.policy.loss_scale.init_scale),
                                    period=prec.policy.loss_scale.growth_interval)
               if prec.policy.loss_scale.enabled else jmp.NoOpLossScale())
    except ImportError:
        jmp = ls0 = None

    def hand_step(p, s, x):  # what users write today: Flax dtype knobs, jmp loss scale, optax
        opt, ls = s
        if jmp is None:
            g = jax.grad(lambda q: _loss(hand_model.apply({"params": q}, x)))(p)
            u, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, u), (opt, ls)
        g = ls.unscale(jax.grad(lambda q: ls.scale(_loss(hand_model.apply({"params": q}, x))))(p))
        finite = jmp.all_finite(g)
        u, new_opt = tx.update(g, opt, p)
        p, opt = jmp.select_tree(finite, (optax.apply_updates(p, u), new_opt), (p, opt))
        return p, (opt, ls.adjust(finite))

    wrapped = prec.wrap_optimizer(tx)

    def prec_step(p, s, x):
        g = jax.grad(lambda q: prec.scale_loss(_loss(prec.apply(plain, {"params": q}, x)), s.loss_scale))(p)
        u, s = wrapped.update(g, s, p)
        return optax.apply_updates(p, u), s

    n_params = sum(a.size for a in jax.tree.leaves(params))
    return {"hand": (hand_step, (tx.init(params), ls0)), "precision": (prec_step, wrapped.init(params))}, params, x, n_params


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def measure(d_model=4096, d_hidden=16384, blocks=4, tokens=16384, steps=10, warmup=3, repeats=3,
            policy="bf16-mixed") -> dict:
    """Compile both steps, then time them interleaved (``repeats`` rounds of ``steps``)."""
    variants, params, x, n_params = _steps(d_model, d_hidden, blocks, tokens, policy)
    compiled, states, compile_s = {}, {}, {}
    for name, (fn, opt_state) in variants.items():
        compiled[name] = jax.jit(fn, donate_argnums=(0, 1))
        p, s = jax.tree.map(jnp.copy, params), opt_state
        t0 = time.perf_counter()  # first call: tracing + compilation (+ one step)
        p, s = _block(compiled[name](p, s, x))
        compile_s[name] = time.perf_counter() - t0
        for _ in range(warmup):
            p, s = _block(compiled[name](p, s, x))
        states[name] = (p, s)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:  # interleaved, so drift hits both alike
            p, s = states[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                p, s = compiled[name](p, s, x)
            _block((p, s))
            times[name].append((time.perf_counter() - t0) / steps)
            states[name] = (p, s)
    flops = 6.0 * n_params * tokens
    out = {"policy": policy, "d_model": d_model, "d_hidden": d_hidden, "blocks": blocks, "tokens": tokens,
           "params": int(n_params), "steps": steps, "repeats": repeats, "device": str(jax.devices()[0].device_kind),
           "jax": jax.__version__}
    for name in variants:
        best = float(np.min(times[name]))
        out[name] = {"step_s": best, "step_s_all": [float(t) for t in times[name]],
                     "tflops": flops / best / 1e12, "compile_s": compile_s[name]}
    out["ratio_precision_over_hand"] = out["precision"]["step_s"] / out["hand"]["step_s"]
    return out


if __name__ == "__main__":  # CPU smoke test with tiny sizes
    import json

    print(json.dumps(measure(d_model=64, d_hidden=256, blocks=2, tokens=128, steps=3, warmup=1, repeats=2),
                     indent=1))
