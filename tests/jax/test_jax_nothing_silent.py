"""Mistakes that used to pass silently in a JAX training loop: each gets an error (the intent
is unambiguous) or a warning given once (it may be deliberate), naming the fix."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from dualprec_jax import Precision, optim
from dualprec_jax import loss_scale as jax_loss_scale
from dualprec_jax.train_state import TrainState


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(x)


X = jnp.ones((2, 3), jnp.float32)


def test_wrapping_an_already_wrapped_optimizer_is_an_error():
    prec = Precision("16-mixed")
    params = prec.init(_Net(), jax.random.PRNGKey(0), X)
    with pytest.raises(TypeError, match=r"already wrapped by prec.wrap_optimizer.*TrainState.create\(tx=optax.adamw"):
        TrainState.create(apply_fn=_Net().apply, params=params["params"],
                          tx=prec.wrap_optimizer(optax.sgd(0.1)), precision=prec)
    with pytest.raises(TypeError, match="already wrapped"):
        prec.wrap_optimizer(prec.wrap_optimizer(optax.sgd(0.1)))
    TrainState.create(apply_fn=_Net().apply, params=params["params"], tx=optax.sgd(0.1), precision=prec)


@pytest.mark.parametrize("policy", ["bf16-true", "16-true,master=true", "bfloat16"])
def test_model_init_instead_of_prec_init_is_caught_at_the_optimizer(policy):
    prec = Precision(policy)
    float32_params = _Net().init(jax.random.PRNGKey(0), X)["params"]  # the model's own init: float32
    with pytest.raises(TypeError, match=r"every parameter given to the optimizer is float32 \(model.init instead "
                                        r"of prec.init\?\).*prec.init\(model, rng, x\)"):
        prec.wrap_optimizer(optax.sgd(0.1)).init(float32_params)
    with pytest.raises(TypeError, match="model.init instead of prec.init"):
        TrainState.create(apply_fn=_Net().apply, params=float32_params, tx=optax.sgd(0.1), precision=prec)
    prec.wrap_optimizer(optax.sgd(0.1)).init(prec.cast_to_param(float32_params))  # the fix works


@pytest.mark.parametrize("policy", ["bf16-mixed", "32-true", "bf16-true,@out=32-true"])
def test_float32_params_are_fine_where_the_policy_keeps_them(policy):
    prec = Precision(policy)
    prec.wrap_optimizer(optax.sgd(0.1)).init(_Net().init(jax.random.PRNGKey(0), X)["params"])


def test_an_update_before_any_scaled_loss_warns_once(monkeypatch):
    monkeypatch.setattr(jax_loss_scale, "SCALE_LOSS_SEEN", [False])
    monkeypatch.setattr(optim, "_WARNED", set())
    prec = Precision("16-mixed")
    params = prec.init(_Net(), jax.random.PRNGKey(0), X)["params"]
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(lambda p: _Net().apply({"params": p}, X).sum())(params)  # forgot scale_loss
    with pytest.warns(UserWarning, match=r"no loss was scaled in this process: differentiate "
                                         r"scale_loss\(loss, opt_state.loss_scale\).*\(65536\) times too small"):
        prec.step(tx, grads, state, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prec.step(tx, grads, state, params)  # once


def test_no_warning_when_the_loss_was_scaled(monkeypatch):
    monkeypatch.setattr(jax_loss_scale, "SCALE_LOSS_SEEN", [False])
    monkeypatch.setattr(optim, "_WARNED", set())
    prec = Precision("16-mixed")
    params = prec.init(_Net(), jax.random.PRNGKey(0), X)["params"]
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    state = tx.init(params)
    grads = jax.grad(lambda p: prec.scale_loss(_Net().apply({"params": p}, X).sum(), state.loss_scale))(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prec.step(tx, grads, state, params)
