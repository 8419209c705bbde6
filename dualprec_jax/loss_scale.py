"""Loss scaling as an explicit pytree state, with the one rule of docs/contract.md (torch.amp.GradScaler's,
plus the optional min/max clamps), exact under jit.

The configuration (the Policy's `dualprec.LossScaleConfig`) is static Python data and never
lives in the state, so no setting can be lost by a pytree flatten (jmp's `DynamicLossScale`
drops its `min_loss_scale` that way).  Only ``scale`` and ``counter`` are state, in a
`LossScaleState` (the same fields and meaning as `dualprec_torch.LossScaleState`); under a
`dualprec_jax.loss_scaled` optimizer it is ``opt_state.loss_scale``, and `scale_loss` is the
one way to scale a loss::

    cfg = Policy.parse("16-mixed").loss_scale
    state = loss_scale_init(cfg)                        # scale 2**16, counter 0
    grads = jax.grad(lambda p: scale_loss(loss(p), state))(params)
    finite = all_finite(grads)                          # on the *scaled* gradients
    grads = unscale(grads, state)                       # times float32(1/scale)
    state = loss_scale_update(state, finite, cfg)       # backoff or (periodically) growth
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dualprec import LossScaleConfig
from dualprec.ref.loss_scale import scale_bounds

__all__ = ["LossScaleState", "loss_scale_init", "loss_scale_update", "all_finite", "leaves_finite",
           "unscale", "scale_loss", "floating_paths"]


class LossScaleState(NamedTuple):
    """Current scale (float32 scalar) and finite steps since the last change (int32 scalar)."""

    scale: jax.Array
    counter: jax.Array


def _config(config: Any) -> LossScaleConfig:
    if not isinstance(config, LossScaleConfig):
        raise TypeError(f"expected a dualprec.LossScaleConfig (policy.loss_scale), got {type(config).__name__}")
    return config


def loss_scale_init(config: LossScaleConfig) -> LossScaleState:
    """Initial state: ``init_scale`` for static and dynamic scaling, 1.0 for none."""
    config = _config(config)
    scale = config.init_scale if config.enabled else 1.0
    return LossScaleState(jnp.asarray(scale, jnp.float32), jnp.asarray(0, jnp.int32))


def _times(scale: jax.Array, factor: float) -> jax.Array:
    """float32(float64(scale) * factor), as GradScaler's CPU kernel forms it.  A factor exact
    in float32 (2.0, 0.5) makes the float32 product the same number; other factors (1.1)
    take the float64 product, traced with x64 switched on for these few ops only (the
    global jax_enable_x64 setting is left alone; TPUs emulate float64 here)."""
    f32 = np.float32(factor)
    if float(f32) == factor:
        return scale * f32
    with jax.enable_x64(True):
        return (scale.astype(jnp.float64) * np.float64(factor)).astype(jnp.float32)


def loss_scale_update(state: LossScaleState, finite, config: LossScaleConfig) -> LossScaleState:
    """The state after a step whose scaled gradients were ``finite`` (a bool scalar).

    Dynamic: non-finite -> scale * backoff (floored at min_scale, and at 2**-126), counter 0;
    finite -> counter + 1, and on reaching growth_interval scale * growth if that is finite
    (capped at max_scale, and at 2**126), counter 0.  Static and none never change.  Jit-friendly: no Python
    branching on traced values.
    """
    config = _config(config)
    if config.kind != "dynamic":
        return state
    lo, hi = scale_bounds(config)  # inside [2**-126, 2**126]: XLA flushes subnormals
    finite = jnp.asarray(finite, bool)
    backed_off = jnp.maximum(_times(state.scale, config.backoff_factor), jnp.float32(lo))
    counter = state.counter + 1
    grows = counter >= config.growth_interval
    grown = _times(state.scale, config.growth_factor)
    grown = jnp.where(jnp.isfinite(grown), grown, state.scale)
    grown = jnp.minimum(grown, jnp.float32(hi))
    scale = jnp.where(finite, jnp.where(grows, grown, state.scale), backed_off)
    counter = jnp.where(finite & ~grows, counter, 0)
    return LossScaleState(scale.astype(jnp.float32), counter.astype(jnp.int32))


def _floating_leaves(tree) -> list:
    return [x for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]


def floating_paths(tree) -> list[str]:
    """Dotted paths of the floating leaves, in the order `leaves_finite` reports them."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            out.append(".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path))
    return out


def leaves_finite(grads) -> jax.Array:
    """One bool per floating leaf (in tree order): every element finite, half-precision leaves
    upcast to float32 and float64 leaves checked in float64 (as torch.amp.GradScaler does:
    1e39 in a float64 gradient is finite)."""
    leaves = _floating_leaves(grads)
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.isfinite(x.astype(jnp.promote_types(x.dtype, jnp.float32))).all() for x in leaves])


def all_finite(grads) -> jax.Array:
    """True when every floating leaf is finite (half precision upcast to float32, float64
    checked as float64, as torch.amp.GradScaler does)."""
    return leaves_finite(grads).all()


def unscale(grads, state: LossScaleState):
    """Gradients times float32(1/scale), in float32 (float64 leaves stay float64)."""
    inv = jnp.float32(1.0) / state.scale

    def go(g):
        if not (hasattr(g, "dtype") and jnp.issubdtype(g.dtype, jnp.floating)):
            return g
        wide = jnp.promote_types(g.dtype, jnp.float32)
        return g.astype(wide) * inv.astype(wide)

    return jax.tree_util.tree_map(go, grads)


#: set once scale_loss has run (or been traced) in this process: a loss-scaled optimizer
#: updated before any scaled loss warns that its gradients are probably unscaled
SCALE_LOSS_SEEN = [False]


def scale_loss(loss, state: LossScaleState):
    """The loss times the current scale: differentiate this.

    Args:
        loss: The loss (any float dtype).
        state: The `LossScaleState`: ``opt_state.loss_scale`` of a `loss_scaled` optimizer
            (``state.loss_scale`` of a TrainState).

    Returns:
        ``loss * scale`` formed in float32 at least (a half-precision loss times 2**16
        overflows).

    Raises:
        TypeError: ``state`` is not a `LossScaleState` (the whole optimizer state, say).
    """
    if not isinstance(state, LossScaleState):
        hint = (": pass its .loss_scale" if hasattr(state, "loss_scale") else "")
        raise TypeError(f"scale_loss(loss, state) takes the LossScaleState (opt_state.loss_scale), got "
                        f"{type(state).__name__}{hint}")
    SCALE_LOSS_SEEN[0] = True
    loss = jnp.asarray(loss)
    wide = jnp.promote_types(loss.dtype, jnp.float32)
    scale = getattr(state.scale, "get_value", lambda: state.scale)()  # nnx.Optimizer wraps its state's leaves
    return loss.astype(wide) * jnp.asarray(scale).astype(wide)
