"""dualprec_jax: carries a dualprec Policy out in JAX (jmp casts, Flax linen and nnx op
policy, loss-scaled optax optimizers).  Mirrors `dualprec_torch` name for name.

Loss scaling, functional first (optax's style): `loss_scaled(tx, policy)` wraps an optax
optimizer (state: `LossScaledOptState`, whose ``loss_scale`` is the `LossScaleState`);
`scale_loss(loss, opt_state.loss_scale)` is the one way to scale a loss and
`last_step(opt_state)` the one reader of what the last update did.  `Precision` is a thin
convenience over them.
"""

from dualprec.deprecation import alias_getattr

from .autocast import AutocastWarning, autocast
from .caps import device_caps
from .diagnose import diagnose
from .loss_scale import LossScaleState, all_finite, loss_scale_init, loss_scale_update, scale_loss, unscale
from .ops import dot_product_attention, log_softmax, softmax
from .optim import LossScaledOptState, last_step, loss_scaled
from .precision import Precision, UnsupportedPolicyError

__all__ = ["Precision", "diagnose", "UnsupportedPolicyError", "device_caps", "loss_scaled", "LossScaledOptState", "last_step",
           "LossScaleState", "loss_scale_init", "loss_scale_update", "all_finite", "unscale",
           "scale_loss", "softmax", "log_softmax", "dot_product_attention", "autocast", "AutocastWarning"]

#: renamed: the optimizer state is ``LossScaledOptState`` (its ``loss_scale`` is the ``LossScaleState``)
__getattr__ = alias_getattr(__name__, globals(), {"LossScaledState": "LossScaledOptState"})
