"""Flax training idioms under a dualprec Policy: a `TrainState` whose optimizer is the
loss-scaled optax wrapper, helpers for ``flax.nnx.Optimizer``, and checkpoints of both with
orbax in the precision checkpoint format.

    prec = Precision("16-mixed")
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3), precision=prec)

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(p):
            loss = jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
            return scale_loss(loss, state.loss_scale), loss  # the scaled loss is differentiated
        grads, loss = jax.grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss  # unscale, skip if non-finite, adjust scale

`TrainState` subclasses ``flax.training.train_state.TrainState``: ``tx`` is the wrapped
optimizer (`dualprec_jax.optim.loss_scaled`, built by ``Precision.wrap_optimizer``) and
``opt_state`` its `LossScaledOptState`, so the loss scale and the master weights travel with
the state through jit, orbax and ``flax.serialization``.  ``step`` counts the updates taken:
a skipped step leaves params, ``step`` and the inner optimizer's state as they were and
only backs the scale off.

With flax.nnx, ``nnx.Optimizer(model, prec.wrap_optimizer(tx), wrt=nnx.Param)`` works as it
is: ``scale_loss(loss, optimizer.opt_state.loss_scale)`` scales the loss and
``dualprec_jax.last_step(optimizer)`` (or ``prec.last_step(optimizer)``) says what the last
update did, as for any other holder of the state.

Checkpoints: `save_checkpoint` / `restore_checkpoint` write one orbax directory holding the
whole state (params, optimizer state, loss scale) and, next to it, the precision state in
the precision checkpoint format (`dualprec.checkpoint`: the header JSON and the flat
``loss_scale.scale`` / ``loss_scale.counter`` / ``master.<name>`` tensors), which the torch
backend reads too.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state as flax_train_state

from dualprec import checkpoint
from dualprec.errors import CheckpointError

from .loss_scale import LossScaleState, scale_loss
from .optim import opt_state_of

__all__ = ["TrainState", "save_checkpoint", "restore_checkpoint"]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new} (one way to scale a loss and one reader of the last step "
                  "in dualprec_jax)", DeprecationWarning, stacklevel=3)


def loss_scale_of(obj) -> LossScaleState:
    """Deprecated: ``dualprec_jax.optim.opt_state_of(obj).loss_scale``."""
    _deprecated("dualprec_jax.train_state.loss_scale_of(obj)", "dualprec_jax.optim.opt_state_of(obj).loss_scale")
    return opt_state_of(obj).loss_scale


def last_step(precision, obj, params=None):
    """Deprecated: ``precision.last_step(obj, params)`` (or ``dualprec_jax.last_step``)."""
    _deprecated("dualprec_jax.train_state.last_step(precision, obj)", "precision.last_step(obj)")
    return precision.last_step(obj, params)


class PolicyApply:
    """``apply_fn`` run as `Precision.apply` runs ``model.apply``: under the whole op table
    (`dualprec_jax.autocast`), outputs in the output dtype (the state of ``mutable=`` as it
    comes).  Equal (and hashing equal) for the same function and Precision, so a TrainState
    holding one is a stable static field under jit."""

    def __init__(self, apply_fn, precision):
        self.fn, self.precision = apply_fn, precision

    def __call__(self, variables, *args, **kwargs):
        from .fp8 import max_accumulating

        out = self.precision._traced(self.fn)(max_accumulating(variables), *args, **kwargs)
        if kwargs.get("mutable"):
            y, state = out
            return self.precision.convert_output(y), state
        return self.precision.convert_output(out)

    def __eq__(self, other):
        return isinstance(other, PolicyApply) and other.fn == self.fn and other.precision is self.precision

    def __hash__(self):
        return hash((self.fn, id(self.precision)))

    def __repr__(self):
        return f"PolicyApply({self.fn!r}, {self.precision!r})"


class TrainState(flax_train_state.TrainState):
    """``flax.training.train_state.TrainState`` with a dualprec `Precision`: ``tx`` is the
    loss-scaled wrapper of the optimizer given to `create`, and `apply_gradients` takes the
    gradients of the *scaled* loss (``scale_loss(loss, state.loss_scale)``)."""

    precision: Any = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, apply_fn, params, tx: optax.GradientTransformation, precision, **kwargs) -> TrainState:
        """A state at step 0 with ``precision.wrap_optimizer(tx)`` initialised on ``params``;
        ``apply_fn`` (``model.apply``) is kept as a `PolicyApply`: ``state.apply_fn(variables,
        x)`` runs the model as ``precision.apply(model, variables, x)`` does (the whole op
        table, outputs in the output dtype).
        ``tx`` is the plain optax optimizer (the wrapper is built here; wrapping twice would
        scale twice).  ``params`` are used as given: cast them first (``prec.init`` or
        ``prec.cast_to_param``)."""
        if precision is None or not hasattr(precision, "wrap_optimizer"):
            raise TypeError("TrainState.create(..., precision=prec): pass a dualprec_jax.Precision "
                            f"(got {type(precision).__name__})")
        wrapped = precision.wrap_optimizer(tx)
        if not isinstance(apply_fn, PolicyApply):
            apply_fn = PolicyApply(apply_fn, precision)
        step = jnp.zeros((), jnp.int32)  # an array, not 0: jit traces the first step once, not twice
        return cls(step=step, apply_fn=apply_fn, params=params, tx=wrapped, opt_state=wrapped.init(params),
                   precision=precision, **kwargs)

    @property
    def loss_scale(self) -> LossScaleState:
        """The current `LossScaleState` (``.scale``, ``.counter``): ``scale_loss(loss,
        state.loss_scale)`` is the loss to differentiate."""
        return self.opt_state.loss_scale

    def scale_loss(self, loss):
        """Deprecated: ``dualprec_jax.scale_loss(loss, state.loss_scale)``."""
        _deprecated("TrainState.scale_loss(loss)", "dualprec_jax.scale_loss(loss, state.loss_scale)")
        return scale_loss(loss, self.loss_scale)

    def apply_gradients(self, *, grads, **kwargs) -> TrainState:
        """One update from the gradients of the scaled loss: the wrapper unscales them, skips
        a non-finite step (params, ``step`` and the inner state kept; scale backed off) and
        adjusts the scale.  Works under jit; under ``nonfinite=raise`` call `check_step`
        outside jit to raise."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        taken = ~opt_state.skipped if opt_state.skipped is not None else True
        step = self.step + jnp.where(taken, 1, 0).astype(jnp.int32)
        return self.replace(step=step, params=params, opt_state=opt_state, **kwargs)

    def last_step(self):
        """Deprecated: ``state.precision.last_step(state)`` (or ``dualprec_jax.last_step``)."""
        _deprecated("TrainState.last_step()", "state.precision.last_step(state)")
        return self.precision.last_step(self.opt_state, self.params)

    def check_step(self) -> TrainState:
        """Raise NonFiniteGradientError if the policy says ``nonfinite=raise`` and the last
        update was skipped; return self otherwise (outside jit)."""
        from dualprec.errors import NonFiniteGradientError

        if self.precision.policy.nonfinite_rule == "raise":
            report = self.precision.last_step(self.opt_state, self.params)
            if report.outcome == "skipped":  # not "none": no update since init or a load
                raise NonFiniteGradientError(f"nonfinite=raise: the gradient of {report.nonfinite_parameter} is "
                                             "not finite (inf/NaN); the step was skipped",
                                             parameter=report.nonfinite_parameter)
        return self

    # ----- the precision state in the checkpoint format ---------------------------------
    def precision_state_dict(self) -> dict:
        """The precision state (policy, loss scale, master weights) as both backends read it."""
        return self.precision.state_dict(self.opt_state)

    def load_precision_state_dict(self, state: dict, *, strict: bool = True) -> TrainState:
        """A copy with the loss scale (and master weights) of a precision state dict."""
        opt_state, _ = self.precision.load_state_dict(state, self.opt_state, strict=strict)
        return self.replace(opt_state=opt_state)


# ----- orbax -------------------------------------------------------------------------------
def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError("checkpoints of a TrainState need orbax: pip install orbax-checkpoint") from None
    return ocp


def save_checkpoint(directory, state: TrainState, *, force: bool = False) -> None:
    """Write ``state`` to the orbax directory ``directory`` (absolute or relative path): item
    ``state`` is the whole pytree (params, optimizer state with the loss scale), items
    ``precision`` and ``precision_header`` the precision state in the checkpoint format (flat
    tensors and the header JSON of `dualprec.checkpoint.state_to_file`)."""
    import os

    ocp = _ocp()
    header, tensors = checkpoint.state_to_file(state.precision_state_dict())
    path = os.path.abspath(os.fspath(directory))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            precision=ocp.args.StandardSave(tensors),
                                            precision_header=ocp.args.JsonSave(header)), force=force)


def restore_checkpoint(directory, target: TrainState, *, precision_only: bool = False,
                       strict: bool = True) -> TrainState:
    """The state saved by `save_checkpoint`, restored into the structure (and shardings) of
    ``target`` (a freshly created TrainState).  ``precision_only``: keep ``target``'s params
    and optimizer state, take only the precision state (e.g. a checkpoint of another policy
    with ``strict=False``, or one written by the torch backend's state)."""
    import os

    ocp = _ocp()
    path = os.path.abspath(os.fspath(directory))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        if precision_only:
            got = ckptr.restore(path, ocp.args.Composite(precision=ocp.args.StandardRestore(),
                                                         precision_header=ocp.args.JsonRestore()))
            tensors = {k: jax.device_get(v) for k, v in got["precision"].items()}
            state = checkpoint.state_from_file(got["precision_header"], tensors)
            return target.load_precision_state_dict(state, strict=strict)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        got = ckptr.restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     precision_header=ocp.args.JsonRestore()))
    restored = got["state"]
    saved = got["precision_header"].get("policy")
    if strict and saved is not None and saved != str(target.precision.policy):
        raise CheckpointError(f'{path}: this checkpoint was written under policy "{saved}", the target runs '
                              f'"{target.precision.policy}"; restore with precision_only=True, strict=False '
                              "to take only what both share")
    return restored
