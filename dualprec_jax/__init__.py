"""dualprec_jax: carries a dualprec Policy out in JAX (jmp casts, Flax linen and nnx op
policy, loss-scaled optax optimizers).  Mirrors `dualprec_torch` name for name."""

from .autocast import AutocastWarning, autocast
from .caps import device_caps
from .diagnose import diagnose
from .loss_scale import LossScaleState, all_finite, loss_scale_init, loss_scale_update, scale_loss, unscale
from .ops import dot_product_attention, log_softmax, softmax
from .optim import LossScaledState, loss_scaled
from .precision import Precision, UnsupportedPolicyError

__all__ = ["Precision", "diagnose", "UnsupportedPolicyError", "device_caps", "loss_scaled", "LossScaledState",
           "LossScaleState", "loss_scale_init", "loss_scale_update", "all_finite", "unscale",
           "scale_loss", "softmax", "log_softmax", "dot_product_attention", "autocast", "AutocastWarning"]
