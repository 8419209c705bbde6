"""The functional JAX API of loss scaling, optax's style: `loss_scaled` wraps any
`optax.GradientTransformation` so that it unscales the gradients, skips non-finite steps
and adjusts the loss scale, with all of its state in one checkpointable NamedTuple
(`LossScaledOptState`, whose ``loss_scale`` field is the `LossScaleState`); `last_step` is the
one reader of what the last update did.  `dualprec_jax.Precision` is a thin convenience
over these.

    tx = loss_scaled(optax.adamw(1e-3), policy)
    opt_state = tx.init(params)
    grads = jax.grad(lambda p: scale_loss(loss_fn(p), opt_state.loss_scale))(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # grads still scaled
    params = optax.apply_updates(params, updates)
    last_step(opt_state).outcome                                # "applied" / "skipped" (outside jit)

A skipped step returns updates of -0.0: ``p + (-0.0)`` is ``p`` bit for bit for every p
(+0.0 would turn -0.0 into +0.0), and the wrapped optimizer's state is kept as it was,
Adam's step count included.  The state records what the last update did (``skipped``, and
when it looked the index of the first non-finite gradient leaf; `NO_STEP` before any
update), so a caller
outside jit can report or raise (`last_step`, `dualprec_jax.Precision.step`).  With
``master_weights`` the state also holds float32 copies
of the (half-precision) parameters; the wrapped optimizer updates those, and the returned
updates move each parameter to its rounded master copy.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualprec import Policy, contract
from dualprec.deprecation import alias_getattr

from . import loss_scale as _loss_scale
from .casts import cast_floating
from .loss_scale import LossScaleState, floating_paths, leaves_finite, loss_scale_init, loss_scale_update, unscale

__all__ = ["LossScaledOptState", "loss_scaled", "last_step", "opt_state_of", "NO_STEP"]


class LossScaledOptState(NamedTuple):
    """The state of a `loss_scaled` optimizer: the wrapped optimizer's state, the
    `LossScaleState`, the float32 master weights (or None) and what the last update did."""

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


def _check_state(state) -> LossScaledOptState:
    if not isinstance(state, LossScaledOptState):
        raise TypeError(f"the loss-scaled optimizer got a {type(state).__name__} as its state, not the "
                        "LossScaledOptState its init() returns; call tx.init(params) on the wrapped "
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
                      "in this process: differentiate scale_loss(loss, opt_state.loss_scale) (state.loss_scale "
                      "with a TrainState), else every update is the scale "
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
        return LossScaledOptState(tx.init(masters if master else params), loss_scale_init(config), masters,
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
        return updates, LossScaledOptState(new_inner, loss_scale_update(state.loss_scale, finite, config),
                                        new_master, ~finite, first)

    setattr(init, _WRAPPED, True)
    return optax.GradientTransformationExtraArgs(init, update)


def _is_variable(x) -> bool:
    nnx = sys.modules.get("flax.nnx")  # an nnx variable exists only once nnx is imported
    return nnx is not None and isinstance(x, nnx.Variable)


def _value(x):
    """The array of an nnx variable (nnx.Optimizer keeps its state as OptArray), or x itself."""
    return x.get_value() if _is_variable(x) else x


def opt_state_of(obj) -> LossScaledOptState:
    """The `LossScaledOptState` of ``obj``, with nnx's variable wrappers taken off its leaves.

    Args:
        obj: A `LossScaledOptState`, or anything holding one as ``.opt_state`` (a
            `dualprec_jax.train_state.TrainState`, an ``nnx.Optimizer`` over a wrapped optimizer).

    Returns:
        The state itself, its leaves plain arrays.

    Raises:
        TypeError: ``obj`` holds no loss-scaled optimizer state.
    """
    opt_state = getattr(obj, "opt_state", obj)
    if not isinstance(opt_state, LossScaledOptState):
        raise TypeError("expected a loss-scaled optimizer state (tx.init(params) of loss_scaled(tx, policy) or "
                        "prec.wrap_optimizer(tx)), a TrainState or an nnx.Optimizer built on one; got "
                        f"{type(opt_state).__name__} (wrap the optax optimizer before handing it over)")
    return jax.tree_util.tree_map(_value, opt_state, is_leaf=_is_variable)


def last_step(opt_state, params=None) -> contract.StepReport:
    """What the last update recorded in a loss-scaled optimizer state did (outside jit).

    Args:
        opt_state: A `LossScaledOptState`, a TrainState or an ``nnx.Optimizer`` holding one.
        params: Any tree of the parameters' structure (the parameters, the gradients) to
            name the first non-finite gradient by its path; without it the report names
            "gradient leaf #k".

    Returns:
        A `dualprec.contract.StepReport`: outcome "none" before any update and after a load,
        "applied" or "skipped"; ``scale`` the loss scale now; ``nonfinite_parameter``.
    """
    return _report(opt_state_of(opt_state), None if params is None else floating_paths(params))


def _report(state: LossScaledOptState, paths: list[str] | None) -> contract.StepReport:
    scale = float(state.loss_scale.scale)
    leaf = int(state.nonfinite_leaf) if state.nonfinite_leaf is not None else NO_STEP
    if state.skipped is None or leaf == NO_STEP:
        return contract.StepReport("none", scale)
    name = None
    if leaf >= 0:
        name = paths[leaf] if paths is not None and leaf < len(paths) else f"gradient leaf #{leaf}"
    return contract.StepReport("skipped" if bool(state.skipped) else "applied", scale, name)


#: renamed: the optimizer state is ``LossScaledOptState`` (its ``loss_scale`` is the ``LossScaleState``)
__getattr__ = alias_getattr(__name__, globals(), {"LossScaledState": "LossScaledOptState"})
