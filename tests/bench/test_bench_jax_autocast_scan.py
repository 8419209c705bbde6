"""The scan bench compares like with like: its hand-written step is the table's arithmetic,
so the autocast step gives the same bits (the ratio it reports is the transformation's cost)."""

import jax
import jax.numpy as jnp
import pytest

from bench import bench_jax_autocast_scan as b


@pytest.mark.slow  # three scanned training steps compiled (about 10 s of CPU)
def test_hand_written_step_is_the_tables_arithmetic():
    params = b.init(2, 16, 32, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 16), jnp.float32)
    assert b.same_bits(params, x)
    # and the table did change something: plain bfloat16 JAX gives other numbers
    fns = b.steps_for(scan=True)
    plain, hand = jax.jit(fns["plain_bf16"])(params, x), jax.jit(fns["hand"])(params, x)
    assert not all(bool(jnp.array_equal(plain[k], hand[k])) for k in plain)
