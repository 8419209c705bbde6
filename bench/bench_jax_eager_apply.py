"""Eager `Precision.apply` calls per second on the README's Flax model (MLP: Dense 64 ->
gelu -> LayerNorm -> Dense 4, batch 32 x 16), with the trace cache and with it emptied
before each call (every call traced again, the behaviour before the cache).

    python -m bench.bench_jax_eager_apply
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax

from dualprec_jax import Precision


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.LayerNorm()(nn.gelu(nn.Dense(64)(x))))


def calls_per_second(policy: str, cached: bool, seconds: float = 3.0) -> float:
    prec = Precision(policy)
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (32, 16))
    variables = prec.init(model, jax.random.key(0), x)
    prec.apply(model, variables, x).block_until_ready()  # compile the eager kernels once
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if not cached:
            prec._trace_cache = type(prec._trace_cache)()
        prec.apply(model, variables, x).block_until_ready()
        n += 1
    return n / (time.perf_counter() - start)


def main():
    for policy in ("bf16-mixed", "16-mixed"):
        before = calls_per_second(policy, cached=False)
        after = calls_per_second(policy, cached=True)
        print(f"{policy}: eager prec.apply {before:.1f} calls/s traced each call, {after:.1f} calls/s "
              f"with the trace cache ({after / before:.2f}x)")


if __name__ == "__main__":
    main()
