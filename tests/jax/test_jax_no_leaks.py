"""autocast leaves nothing behind: jitted functions run under it (under two policies), then
plainly, give the bits and dtypes of a process that never imported dualprec; a jitted helper
traced plainly first still gets the table inside autocast; the rule of an op does not depend
on how it was imported or whether it runs inside scan/checkpoint."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec_jax import Precision, autocast
from tests.jax import leak_functions as lf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_plain_calls_after_autocast_equal_a_process_without_dualprec(tmp_path):
    out = tmp_path / "clean.npz"
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "tests.jax.leak_functions", str(out)], check=True, cwd=ROOT, env=env,
                   timeout=300)
    clean = np.load(out)

    for policy in ("16-mixed", "bf16-mixed"):  # each traces every function under the table
        for dtype in lf.DTYPES:
            x, w = lf.inputs(dtype)
            under = jax.jit(autocast(lambda x, w: {k: f(x, w) for k, f in lf.FUNCTIONS.items()}, policy))(x, w)
            assert under["softmax"].dtype == jnp.float32  # the table did run
    # Precision.apply of a Flax model too (the linen interceptor traced inside)
    import flax.linen as nn

    Precision("16-mixed").apply(nn.Dense(8), lf._DENSE_VARS, lf.inputs("float16")[0])

    after = lf.run_all()
    wrong = []
    for key, got in after.items():
        ref = clean[key.replace("/", "__")]
        if str(got.dtype) != str(clean["dtype__" + key.replace("/", "__")]):
            wrong.append(f"{key}: dtype {got.dtype}, clean process {clean['dtype__' + key.replace('/', '__')]}")
        elif not np.array_equal(lf.bits(got), ref):
            wrong.append(f"{key}: bits differ")
    assert not wrong, wrong
    assert len(after) == len(lf.FUNCTIONS) * len(lf.DTYPES)


def test_jitted_helper_traced_plainly_first_gets_the_table():
    x = jnp.linspace(-2, 2, 32).reshape(4, 8).astype(jnp.bfloat16)
    helper = jax.jit(lambda x: jax.nn.softmax(x) @ jnp.ones((8, 8), jnp.float32))
    assert helper(x).dtype == jnp.float32  # plain: bf16 softmax, then promotion with float32
    soft = jax.jit(lambda x: jax.nn.softmax(x))
    assert soft(x).dtype == jnp.bfloat16
    got = autocast(lambda x: (soft(x), helper(x)), "bf16-mixed")(x)
    assert got[0].dtype == jnp.float32  # softmax is on the float32 list
    assert got[1].dtype == jnp.bfloat16  # the matmul is on the lower list
    assert soft(x).dtype == jnp.bfloat16  # and plain again afterwards


def test_jitted_flax_and_activation_helpers_traced_plainly_first_get_the_table():
    import flax.linen as nn

    x = (jnp.linspace(-3, 3, 64).reshape(4, 16) ** 3).astype(jnp.float32)
    dense = jax.jit(lambda v, x: nn.Dense(8).apply(v, x))
    v = nn.Dense(8).init(jax.random.key(0), x)
    assert dense(v, x).dtype == jnp.float32  # traced plainly first
    assert autocast(dense, "bf16-mixed")(v, x).dtype == jnp.bfloat16  # the stock layer's rule
    gelu = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
    xb = x.astype(jnp.bfloat16)
    gelu(xb)
    direct = autocast(lambda x: jax.nn.gelu(x, approximate=False), "bf16-mixed")(xb)
    through = autocast(gelu, "bf16-mixed")(xb)
    assert np.array_equal(np.asarray(direct, np.float32), np.asarray(through, np.float32))
