"""The sharded-JAX checks of tests/jax/test_jax_sharding.py, run in a process of its own with
4 host devices (XLA_FLAGS must be set before JAX starts).  Prints one "OK <name>" per check."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from dualprec.errors import PolicyError, UnsupportedPolicyError  # noqa: E402
from dualprec_jax import Precision  # noqa: E402
from dualprec_jax.sharding import check_jit_reduce, fsdp_rules, reduce_gradients, shard_params  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
MESH = Mesh(np.array(jax.devices()), ("data",))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="fc1")(x))
        return nn.Dense(8, name="fc2")(x)


def data(poison=False):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    y = rng.standard_normal((16, 8)).astype(np.float32)
    if poison:
        x[13, 3] = np.inf  # a row of the last data shard only
    return x, y


def train(policy, sharded, steps=3, poison_step=None):
    prec = Precision(policy)
    model = MLP()
    x, y = data()
    params = prec.init(model, jax.random.key(0), jnp.asarray(x[:2]))["params"]
    if sharded:
        params = shard_params(params, MESH, fsdp_rules(params, MESH, "data", min_size=256), policy=policy)
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(p):
            out = prec.apply(model, {"params": p}, x)
            return prec.scale_loss(jnp.mean((out.astype(jnp.float32) - y) ** 2), state.loss_scale)

        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    scales = []
    for i in range(steps):
        xb, yb = data(poison=i == poison_step)
        if sharded:
            batch = NamedSharding(MESH, P("data"))
            xb, yb = jax.device_put(xb, batch), jax.device_put(yb, batch)
        params, state = step(params, state, xb, yb)
        scales.append(float(state.loss_scale.scale))
    return params, scales


def check_sharded_jit_matches_unsharded():
    for policy in ("32-true", "bf16-mixed", "16-mixed"):
        ref, ref_scales = train(policy, sharded=False)
        got, scales = train(policy, sharded=True)
        assert scales == ref_scales, (policy, scales, ref_scales)
        kernel = got["fc1"]["kernel"]
        assert kernel.sharding.spec == P("data", None) or kernel.sharding.spec == P(None, "data"), kernel.sharding
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            assert a.dtype == b.dtype == jnp.float32, (policy, a.dtype, b.dtype)
            # gradients of half-precision dots are rounded to the compute dtype once per shard's
            # partial product: a few ULP of it, times the learning rate, in the parameters
            atol = {"32-true": 2e-6, "bf16-mixed": 5e-5, "16-mixed": 1e-5}[policy]
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=atol, err_msg=policy)
    print("OK sharded_jit_matches_unsharded")


def check_one_loss_scale_decision():
    ref, _ = train("16-mixed", sharded=True, steps=1)
    got, scales = train("16-mixed", sharded=True, steps=2, poison_step=1)
    assert scales == [65536.0, 32768.0], scales  # the poisoned step is skipped on every shard
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK one_loss_scale_decision")


def check_reduce_dtype_in_shard_map():
    from jax import shard_map

    policy = "bf16-mixed,reduce=bf16"
    grads = {"fc": {"kernel": jnp.arange(32.0).reshape(4, 8) / 7}}

    def local(g):
        return reduce_gradients(g, "data", policy)

    f = jax.jit(shard_map(local, mesh=MESH, in_specs=P("data"), out_specs=P()))
    text = str(jax.make_jaxpr(f)(grads))
    assert "bf16" in text and ("psum" in text or "pmean" in text), text
    out = f(grads)["fc"]["kernel"]
    rows = np.asarray(grads["fc"]["kernel"]).astype(jnp.bfloat16).astype(np.float32)
    expected = rows.reshape(4, 1, 8).astype(np.float32)
    assert out.dtype == jnp.float32 and out.shape == (1, 8), (out.dtype, out.shape)
    np.testing.assert_allclose(np.asarray(out)[0], expected.mean(0)[0], rtol=1e-2)
    print("OK reduce_dtype_in_shard_map")


def check_bad_input():
    params = {"odd": {"kernel": jnp.zeros((6, 3))}}
    try:
        shard_params(params, MESH, [("odd.kernel", P("data"))])
    except PolicyError as e:
        assert "not divisible" in str(e) and "odd.kernel" in str(e), e
    else:
        raise AssertionError("a mesh that does not divide a parameter was accepted")
    try:
        shard_params(params, MESH, [("blocks.*", P("data"))])
    except PolicyError as e:
        assert "matches no parameter" in str(e), e
    else:
        raise AssertionError("a rule matching nothing was accepted")
    try:
        check_jit_reduce("bf16-mixed,reduce=bf16")
    except UnsupportedPolicyError as e:
        assert "shard_map" in str(e), e
    else:
        raise AssertionError("reduce=bf16 under sharded jit was accepted")
    check_jit_reduce("bf16-mixed")
    print("OK bad_input")


if __name__ == "__main__":
    check_sharded_jit_matches_unsharded()
    check_one_loss_scale_decision()
    check_reduce_dtype_in_shard_map()
    check_bad_input()
