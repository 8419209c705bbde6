"""dualprec: one mixed-precision / low-bit training policy for PyTorch and JAX.

The spec layer: the Policy value, its parser and canonical names, presets, serialization,
capability checks.  It imports neither torch nor JAX; `dualprec_torch` and `dualprec_jax`
carry a Policy out, `dualprec.ref` holds the reference numerics in NumPy.
"""

from .capabilities import CheckReport, DeviceCaps, check_policy
from .deprecation import alias_getattr
from .errors import PolicyError, UnsupportedPolicyError
from .explain import explain
from .policy import FP8Recipe, LossScaleConfig, Policy, Quantization
from .presets import presets

__all__ = ["Policy", "LossScaleConfig", "Quantization", "FP8Recipe", "PolicyError", "UnsupportedPolicyError", "presets",
           "DeviceCaps", "CheckReport", "check_policy", "explain", "__version__"]
__version__ = "0.1.0"


#: renamed: the configuration is ``LossScaleConfig`` (the state is a backend's ``LossScaleState``)
__getattr__ = alias_getattr(__name__, globals(), {"LossScale": "LossScaleConfig"})
