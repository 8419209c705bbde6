"""The loss-scaled optax wrapper: skipped steps change nothing, any optimizer composes,
state checkpoints and resumes bit for bit, sharded arrays work, misuse fails clearly."""

import os
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualprec_jax import LossScaledOptState, Precision
from tests.jax.conftest import assert_bitwise_equal

PARAMS = {"w": jnp.array([[-0.0, 1.5], [2.0, -3.0]]), "b": jnp.array([0.25, -0.0])}


def _grads(scale, overflow=False):
    g = jax.tree.map(lambda p: (p + 1.0) * scale, PARAMS)
    return {**g, "w": g["w"].at[0, 0].set(jnp.inf)} if overflow else g


def test_skipped_step_leaves_params_and_adam_state_unchanged_bitwise():
    prec = Precision("16-mixed")
    tx = prec.wrap_optimizer(optax.adamw(1e-2))
    state = tx.init(PARAMS)
    updates, state = tx.update(_grads(state.loss_scale.scale), state, PARAMS)  # one real step
    params = optax.apply_updates(PARAMS, updates)
    before = (params, state.inner)
    updates, new_state = jax.jit(tx.update)(_grads(state.loss_scale.scale, overflow=True), state, params)
    after = optax.apply_updates(params, updates)
    assert_bitwise_equal((after, new_state.inner), before)  # -0.0 stays -0.0, Adam count stays 1
    assert int(new_state.inner[0].count) == 1
    assert float(new_state.loss_scale.scale) == float(state.loss_scale.scale) / 2
    assert int(new_state.loss_scale.counter) == 0


def test_finite_step_equals_the_plain_optimizer_on_unscaled_grads():
    prec = Precision("16-mixed")
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    tx = prec.wrap_optimizer(inner)
    state = tx.init(PARAMS)
    updates, state2 = tx.update(_grads(state.loss_scale.scale), state, PARAMS)
    expect, _ = inner.update(_grads(1.0), inner.init(PARAMS), PARAMS)
    assert_bitwise_equal(updates, expect)
    assert int(state2.loss_scale.counter) == 1


def test_no_loss_scale_applies_every_step():
    tx = Precision("bf16-mixed").wrap_optimizer(optax.sgd(1.0))
    updates, _ = tx.update(_grads(1.0, overflow=True), tx.init(PARAMS), PARAMS)
    assert not bool(jnp.isfinite(updates["w"]).all())  # as torch without a GradScaler


def _train(tx, params, state, n, scale_of):
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for i in range(n):
        updates, state = step(params, state, _grads(scale_of(state), overflow=(i % 3 == 2)))
        params = optax.apply_updates(params, updates)
    return params, state


def test_checkpoint_resume_is_bit_identical_flax_serialization():
    prec = Precision("16-mixed")
    tx = prec.wrap_optimizer(optax.adam(1e-3))
    scale_of = lambda s: s.loss_scale.scale  # noqa: E731
    params, state = _train(tx, PARAMS, tx.init(PARAMS), 4, scale_of)
    blob = flax.serialization.to_bytes({"params": params, "opt": state})
    straight = _train(tx, params, state, 4, scale_of)
    template = {"params": PARAMS, "opt": tx.init(PARAMS)}
    restored = flax.serialization.from_bytes(template, blob)
    assert isinstance(restored["opt"], LossScaledOptState)
    resumed = _train(tx, restored["params"], restored["opt"], 4, scale_of)
    assert_bitwise_equal(resumed, straight)


@pytest.mark.slow
def test_checkpoint_resume_with_orbax(tmp_path):
    import orbax.checkpoint as ocp

    prec = Precision("params=bf16,compute=bf16,output=f32,master=true,loss=dynamic")
    tx = prec.wrap_optimizer(optax.adam(1e-3))
    p0 = prec.cast_to_param(PARAMS)
    params, state = _train(tx, p0, tx.init(p0), 3, lambda s: s.loss_scale.scale)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ck", {"params": params, "opt": state})
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ck", {"params": params, "opt": state})
    assert_bitwise_equal(restored, {"params": params, "opt": state})


def test_master_weights_keep_float32_copies():
    prec = Precision("params=bf16,compute=bf16,output=f32,master=true")
    p = prec.cast_to_param(PARAMS)
    tx = prec.wrap_optimizer(optax.sgd(1e-3))
    state = tx.init(p)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
    new = optax.apply_updates(p, updates)
    assert {a.dtype for a in jax.tree.leaves(state.master)} == {jnp.dtype(jnp.float32)}
    # 1.5 - 1e-3 is lost in bfloat16 but kept by the master copy.
    assert float(state.master["w"][0, 1]) == np.float32(1.5) - np.float32(1e-3)
    assert_bitwise_equal(new, jax.tree.map(lambda m: m.astype(jnp.bfloat16), state.master))


def test_update_without_its_state_fails_clearly():
    tx = Precision("16-mixed").wrap_optimizer(optax.adam(1e-3))
    with pytest.raises(TypeError, match="LossScaledOptState its init"):
        tx.update(PARAMS, optax.adam(1e-3).init(PARAMS), PARAMS)
    with pytest.raises(TypeError, match=r"takes the LossScaleState \(opt_state.loss_scale\), got dict"):
        Precision("16-mixed").scale_loss(1.0, {"scale": 2.0})


def test_one_way_to_scale_a_loss_and_one_reader_of_the_last_step():
    """The functional API (optax style) and Precision's methods are the same functions; the
    old spellings still work, each with a DeprecationWarning naming the new one."""
    import warnings

    from dualprec import Policy
    from dualprec_jax import last_step, loss_scaled, scale_loss
    from dualprec_jax.train_state import TrainState

    policy = Policy.parse("16-mixed,loss_scale=dynamic(init=2**10,interval=2)")
    tx = loss_scaled(optax.sgd(0.1), policy)
    state = tx.init(PARAMS)
    assert last_step(state).outcome == "none" and last_step(state).scale == 2.0**10
    loss = jnp.asarray(3.0, jnp.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one way warns about nothing
        scaled = scale_loss(loss, state.loss_scale)
        assert_bitwise_equal(scaled, Precision(policy).scale_loss(loss, state.loss_scale))
    assert scaled.dtype == jnp.float32 and float(scaled) == 3.0 * 2**10
    with pytest.raises(TypeError, match=r"got LossScaledOptState: pass its .loss_scale"):
        scale_loss(loss, state)
    _, state = tx.update(_grads(2.0**10, overflow=True), state, PARAMS)
    report = last_step(state, PARAMS)
    assert (report.outcome, report.scale, report.nonfinite_parameter) == ("skipped", 2.0**9, "w")
    assert last_step(state).nonfinite_parameter == "gradient leaf #1"  # no tree to name it from: its index

    prec = Precision(policy)
    with pytest.warns(DeprecationWarning, match=r"scale_loss\(loss, opt_state.loss_scale\)"):
        assert float(prec.scale_loss(loss, state)) == 3.0 * 2**9
    ts = TrainState.create(apply_fn=lambda v, x: x, params=PARAMS, tx=optax.sgd(0.1), precision=prec)
    assert isinstance(ts.loss_scale, type(state.loss_scale)) and float(ts.loss_scale.scale) == 2.0**10
    with pytest.warns(DeprecationWarning, match=r"dualprec_jax.scale_loss\(loss, state.loss_scale\)"):
        assert float(ts.scale_loss(loss)) == 3.0 * 2**10
    with pytest.warns(DeprecationWarning, match=r"state.precision.last_step\(state\)"):
        assert ts.last_step() == prec.last_step(ts) == last_step(ts)
    from dualprec_jax import train_state
    with pytest.warns(DeprecationWarning, match=r"precision.last_step\(obj\)"):
        assert train_state.last_step(prec, ts) == last_step(ts)
    with pytest.warns(DeprecationWarning, match=r"opt_state_of\(obj\).loss_scale"):
        assert_bitwise_equal(train_state.loss_scale_of(ts), ts.loss_scale)
    import dualprec_jax
    with pytest.warns(DeprecationWarning, match="use dualprec_jax.LossScaledOptState"):
        assert dualprec_jax.LossScaledState is LossScaledOptState
    import dualprec
    with pytest.warns(DeprecationWarning, match="use dualprec.LossScaleConfig"):
        assert dualprec.LossScale is dualprec.LossScaleConfig is type(policy.loss_scale)


def test_load_state_dict_returns_one_type():
    prec = Precision("16-mixed")
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    state = tx.init(PARAMS)
    saved = prec.state_dict(state)
    loaded = prec.load_state_dict(saved, state)
    assert isinstance(loaded, tuple) and len(loaded) == 2 and loaded[1] is None
    assert isinstance(loaded[0], LossScaledOptState)
    variables = {"params": PARAMS}
    opt_state, back = prec.load_state_dict(saved, state, variables)
    assert isinstance(opt_state, LossScaledOptState) and back is variables


@pytest.mark.slow
def test_sharded_arrays_under_jit():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, optax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from dualprec_jax import Precision
        mesh = Mesh(np.array(jax.devices()), ("d",))
        shard = NamedSharding(mesh, P("d"))
        params = {"w": jax.device_put(jnp.arange(8.0), shard)}
        prec = Precision("16-mixed")
        tx = prec.wrap_optimizer(optax.adam(0.1))
        state = tx.init(params)
        @jax.jit
        def step(p, s):
            g = jax.grad(lambda q: prec.scale_loss(jnp.sum(q["w"] ** 2), s.loss_scale))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        p, s = step(params, state)
        assert len(jax.devices()) == 2 and p["w"].sharding.spec == P("d"), p["w"].sharding
        ref = optax.adam(0.1)
        u, _ = ref.update({"w": 2 * jnp.arange(8.0)}, ref.init({"w": jnp.arange(8.0)}))
        np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(jnp.arange(8.0) + u["w"]), rtol=1e-6)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
