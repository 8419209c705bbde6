"""Precision's behaviour where the contract fixes it: check() against the Precision's own
device (a jax.Device accepted), the non-finite parameter named under nonfinite=skip, and
last_step "none" before any step and after a load."""

import jax
import jax.numpy as jnp
import optax

from dualprec import DeviceCaps
from dualprec_jax import Precision, device_caps


def test_check_uses_the_precisions_own_device_and_takes_a_jax_device():
    cuda_v100 = DeviceCaps("cuda", "V100", (7, 0), backend="jax")
    prec = Precision("16-mixed", device=cuda_v100)
    assert prec.check() == prec.policy.check(cuda_v100)
    assert prec.check() != prec.policy.check(device_caps())  # not this machine's CPU
    dev = jax.devices()[0]
    assert prec.check(dev) == prec.policy.check(device_caps(dev))
    assert prec.check("cpu") == prec.policy.check(device_caps(jax.devices("cpu")[0]))


def test_last_step_none_before_a_step_and_after_a_load_and_skip_names_the_parameter():
    prec = Precision("bf16-mixed,nonfinite=skip")
    params = {"weight": jnp.ones((2, 3)), "bias": jnp.zeros(3)}
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    opt_state = tx.init(params)
    assert prec.last_step(opt_state).outcome == "none"
    grads = {"weight": jnp.full((2, 3), jnp.inf), "bias": jnp.ones(3)}
    new_params, opt_state = prec.step(tx, grads, opt_state, params)
    report = prec.last_step(opt_state)
    assert report.outcome == "skipped" and report.nonfinite_parameter == "weight"
    assert jax.tree.map(lambda a, b: bool((a == b).all()), new_params, params) == {"weight": True, "bias": True}
    _, opt_state = prec.step(tx, {"weight": jnp.ones((2, 3)), "bias": jnp.ones(3)}, opt_state, new_params)
    assert prec.last_step(opt_state).outcome == "applied"
    loaded, _ = prec.load_state_dict(prec.state_dict(opt_state), opt_state)
    assert prec.last_step(loaded).outcome == "none"
    # inside jit too (the state carries it)
    fresh = jax.jit(tx.init)(params)
    assert prec.last_step(fresh).outcome == "none"
