"""dualprec_torch: carry a dualprec Policy out in PyTorch training.

`Precision` is the one object a training script needs; `device_caps` describes the device
to the spec's capability checks; `FP32_OPS` lists what the op policy keeps in float32;
`LossScaleState` is the loss-scale state (``Precision.loss_scale``) and `LossScaler` the
stateful helper behind it.
"""

from .caps import device_caps
from .diagnose import diagnose
from .loss_scale import LossScaler, LossScaleState
from .ops import FP32_OPS
from .precision import Precision, UnsupportedPolicyError

__all__ = ["Precision", "diagnose", "device_caps", "FP32_OPS", "UnsupportedPolicyError", "LossScaleState",
           "LossScaler"]
