"""A loss-scaled optax optimizer: a wrapper around any `optax.GradientTransformation` that
unscales the gradients, skips non-finite steps and adjusts the loss scale, with all of its
state in one checkpointable pytree (`LossScaledState`).

    tx = loss_scaled(optax.adamw(1e-3), policy)
    opt_state = tx.init(params)
    grads = jax.grad(lambda p: scale_loss(loss_fn(p), opt_state.loss_scale))(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # grads still scaled
    params = optax.apply_updates(params, updates)

A skipped step returns updates of -0.0: ``p + (-0.0)`` is ``p`` bit for bit for every p
(+0.0 would turn -0.0 into +0.0), and the wrapped optimizer's state is kept as it was,
Adam's step count included.  The state records what the last update did (``skipped``, and
when it looked the index of the first non-finite gradient leaf; `NO_STEP` before any
update), so a caller
outside jit can report or raise (`dualprec_jax.Precision.step` / ``last_step``).  With
``master_weights`` the state also holds float32 copies
of the (half-precision) parameters; the wrapped optimizer updates those, and the returned
updates move each parameter to its rounded master copy.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualprec import Policy

from . import loss_scale as _loss_scale
from .casts import cast_floating
from .loss_scale import LossScaleState, leaves_finite, loss_scale_init, loss_scale_update, unscale

__all__ = ["LossScaledState", "loss_scaled", "NO_STEP"]


class LossScaledState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    loss_scale: LossScaleState
    master: Any = None  # float32 master weights, or None
    skipped: Any = None  # bool scalar: the last update was skipped for non-finite gradients
    nonfinite_leaf: Any = None  # int32 scalar: first non-finite gradient leaf (-1: none or not looked;
    #                             NO_STEP: no update since init or a load)


#: ``nonfinite_leaf`` of a state no update has run on yet (init, or a loaded checkpoint)
NO_STEP = -2


def _select(keep_new, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def _skip_updates(finite, updates):
    return jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.asarray(-0.0, u.dtype)), updates)


def _move_to(params, targets):
    """Updates u with ``optax.apply_updates(params, u) == targets`` (exact where the float32
    difference is, i.e. whenever target and param are within a factor 2: Sterbenz)."""
    return jax.tree_util.tree_map(
        lambda p, t: t.astype(jnp.float32) - p.astype(jnp.float32), params, targets)


def _check_state(state) -> LossScaledState:
    if not isinstance(state, LossScaledState):
        raise TypeError(f"the loss-scaled optimizer got a {type(state).__name__} as its state, not the "
                        "LossScaledState its init() returns; call tx.init(params) on the wrapped "
                        "optimizer and pass that state (a restored checkpoint must be restored into "
                        "the same structure, e.g. with flax.serialization.from_state_dict)")
    return state


_WRAPPED = "_dualprec_loss_scaled"  # marks the init function of a wrapper built here
_WARNED: set[str] = set()


def _check_tx(tx) -> None:
    if getattr(getattr(tx, "init", None), _WRAPPED, False):
        raise TypeError("this optimizer is already wrapped by prec.wrap_optimizer (loss_scaled); wrapping it "
                        "again would unscale the gradients twice and nest two loss scales. Pass the plain optax "
                        "optimizer: TrainState.create(tx=optax.adamw(1e-3), precision=prec) wraps it itself")
    if isinstance(tx, optax.GradientTransformation) or (hasattr(tx, "init") and hasattr(tx, "update")):
        return
    name = getattr(tx, "__qualname__", None) or type(tx).__name__
    hint = (f"; {name} is the optimizer's factory: call it, e.g. {name}(1e-3)" if callable(tx)
            else "")
    raise TypeError(f"expected an optax.GradientTransformation such as optax.adamw(1e-3), got "
                    f"{type(tx).__name__} {name}{hint}")


def _check_params(params, policy: Policy) -> None:
    """float32 parameters under a half-precision param dtype are the model's own init
    (``model.init``) instead of ``prec.init``: every step would run in float32."""
    want = jnp.dtype(policy.param_dtype)
    if (want == jnp.float32 or policy.quantization is not None or policy.fp8 is not None
            or any(p.param_dtype == "float32" for _, p in policy.overrides)):
        return
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}
    if dtypes == {jnp.dtype(jnp.float32)}:
        raise TypeError(f'"{policy}" keeps {want.name} parameters, but every parameter given to the optimizer is '
                        "float32 (model.init instead of prec.init?): build them with prec.init(model, rng, x) "
                        "or cast them with prec.cast_to_param(params) before tx.init / TrainState.create")


def _warn_if_loss_unscaled(config) -> None:
    if config.enabled and not _loss_scale.SCALE_LOSS_SEEN[0] and "unscaled" not in _WARNED:
        _WARNED.add("unscaled")
        warnings.warn("the loss-scaled optimizer divides the gradients by the loss scale, but no loss was scaled "
                      "in this process: differentiate prec.scale_loss(loss, opt_state) (or "
                      "state.scale_loss(loss) with TrainState), else every update is the scale "
                      f"({config.init_scale:g}) times too small (warned once; ignore it if you multiply "
                      "by opt_state.loss_scale.scale yourself)", UserWarning, stacklevel=3)


def loss_scaled(tx: optax.GradientTransformation, policy: Policy) -> optax.GradientTransformationExtraArgs:
    """Wrap ``tx`` with the loss scaling (and master weights) of ``policy``.

    ``update`` takes the gradients of the *scaled* loss.  Non-finite steps follow
    ``policy.nonfinite_rule``: skipped under loss scaling (static or dynamic) and under
    ``nonfinite=skip|raise``; applied without looking with ``nonfinite=apply`` (the default
    without loss scaling, as in torch without a GradScaler).
    """
    _check_tx(tx)
    config = policy.loss_scale
    rule = policy.nonfinite_rule
    skips = rule != "apply"
    master = policy.master_weights

    def init(params):
        _check_params(params, policy)
        masters = cast_floating(params, jnp.float32) if master else None
        return LossScaledState(tx.init(masters if master else params), loss_scale_init(config), masters,
                               jnp.asarray(False), jnp.asarray(NO_STEP, jnp.int32))

    def update(grads, state, params=None, **extra):
        state = _check_state(state)
        _warn_if_loss_unscaled(config)
        flags = leaves_finite(grads) if skips else jnp.ones((0,), bool)
        finite = flags.all()
        first = (jnp.where(finite, -1, jnp.argmin(flags)).astype(jnp.int32) if skips and flags.size
                 else jnp.asarray(-1, jnp.int32))
        grads = unscale(grads, state.loss_scale) if config.enabled else grads
        if master:
            if params is None:
                raise ValueError("master weights need the parameters: call tx.update(grads, state, params)")
            new_updates, new_inner = tx.update(cast_floating(grads, jnp.float32), state.inner,
                                               state.master, **extra)
            new_master = optax.apply_updates(state.master, new_updates)
            targets = jax.tree_util.tree_map(lambda m, p: m.astype(p.dtype), new_master, params)
            updates = _move_to(params, targets)
            new_master = _select(finite, new_master, state.master)
        else:
            updates, new_inner = tx.update(grads, state.inner, params, **extra)
            new_master = None
        if skips:
            updates = _skip_updates(finite, updates)
            new_inner = _select(finite, new_inner, state.inner)
        return updates, LossScaledState(new_inner, loss_scale_update(state.loss_scale, finite, config),
                                        new_master, ~finite, first)

    setattr(init, _WRAPPED, True)
    return optax.GradientTransformationExtraArgs(init, update)
