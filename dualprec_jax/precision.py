"""`Precision`: one object that carries a dualprec Policy out in JAX, mirroring
`dualprec_torch.Precision` name for name where JAX allows.

    prec = Precision("bf16-mixed")
    variables = prec.init(model, rng, x)              # linen: params in the param dtype
    y = prec.apply(model, variables, x)               # op policy inside, output dtype outside
    tx = prec.wrap_optimizer(optax.adamw(1e-3))       # unscale, skip non-finite, adjust scale

    model = prec.setup(nnx_model)                     # nnx: in place, once
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import jax

from dualprec import CheckReport, DeviceCaps, Policy, PolicyError
from dualprec.errors import UnsupportedPolicyError

from . import flax_linen, flax_nnx
from .caps import device_caps
from .casts import cast_floating, jax_dtype
from .loss_scale import LossScaleState, scale_loss
from .optim import LossScaledState, loss_scaled

__all__ = ["Precision", "UnsupportedPolicyError"]

log = logging.getLogger("dualprec_jax")


def _unsupported_features(policy: Policy) -> list[str]:
    found = []
    for path, p in (("", policy),) + policy.overrides:
        where = f" (override @{path})" if path else ""
        if p.quantization is not None:
            found.append(f"quantization {p.quantization.mode}{where}: the JAX NF4/FP4/int8 layers are "
                         "a later issue")
        if p.fp8 is not None:
            found.append(f"fp8 {p.fp8.scaling} scaling{where}: the JAX FP8 recipes are a later issue")
    return found


def _ensure_x64(policy: Policy, enable_x64: bool) -> None:
    if not policy.needs_x64 or jax.config.read("jax_enable_x64"):
        return
    if not enable_x64:
        raise PolicyError(f'"{policy}" uses float64, but jax_enable_x64 is off and enable_x64=False; '
                          "JAX would compute in float32. Turn x64 on or choose a 32-bit policy")
    message = (f'dualprec_jax: "{policy}" uses float64, so jax_enable_x64 is now ON for this process '
               "(JAX computes in float32 otherwise); new arrays default to 64 bits from here on")
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    jax.config.update("jax_enable_x64", True)


class Precision:
    """A Policy carried out in JAX: jmp-style pytree casts, Flax linen/nnx op policy,
    loss-scaled optax optimizers, device checks.

    ``enable_x64``: a float64 policy turns jax_enable_x64 on (with a warning) when True,
    raises PolicyError when False.  ``caps``: the device to check against (default: JAX's
    first device); a policy the device cannot run raises PolicyError naming the fallback.
    """

    def __init__(self, policy: Any = "32-true", *, enable_x64: bool = True, caps: DeviceCaps | None = None):
        self.policy = Policy.parse(policy)
        problems = _unsupported_features(self.policy)
        if problems:
            raise UnsupportedPolicyError(f'dualprec_jax cannot run "{self.policy}" yet: ' + "; ".join(problems))
        self.caps = device_caps() if caps is None else caps
        self.check(self.caps).raise_if_unrunnable()
        _ensure_x64(self.policy, enable_x64)

    def __repr__(self) -> str:
        return f'Precision("{self.policy}")'

    # ----- dtypes and casts (jmp's vocabulary) -----------------------------------------
    @property
    def param_dtype(self):
        return jax_dtype(self.policy.param_dtype)

    @property
    def compute_dtype(self):
        return jax_dtype(self.policy.compute_dtype)

    @property
    def output_dtype(self):
        return jax_dtype(self.policy.output_dtype)

    def cast_to_param(self, tree):
        return cast_floating(tree, self.param_dtype, "cast_to_param")

    def cast_to_compute(self, tree):
        return cast_floating(tree, self.compute_dtype, "cast_to_compute")

    def cast_to_output(self, tree):
        return cast_floating(tree, self.output_dtype, "cast_to_output")

    convert_input = cast_to_compute  # dualprec_torch / Lightning Fabric names
    convert_output = cast_to_output

    def to_jmp(self):
        """The top-level policy as a ``jmp.Policy`` (jmp has no per-module overrides)."""
        import jmp  # optional at run time: the GPU machines have no jmp

        if self.policy.overrides:
            warnings.warn("to_jmp(): jmp has no per-module overrides; they are dropped", stacklevel=2)
        return jmp.Policy(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype,
                          output_dtype=self.output_dtype)

    # ----- Flax -----------------------------------------------------------------------
    def autocast(self):
        """Context manager: linen modules called inside follow the op policy."""
        return flax_linen.autocast(self.policy)

    @contextlib.contextmanager
    def init_module(self):
        """Context manager for creating linen parameters (model.init) in the param dtype."""
        with self.autocast():
            yield

    def init(self, model, rngs, *args, **kwargs):
        """``model.init`` under the policy: parameters created in the param dtype of their path."""
        with self.autocast():
            variables = model.init(rngs, *args, **kwargs)
        return self._params_to_policy(variables)

    def apply(self, model, variables, *args, **kwargs):
        """``model.apply`` under the op policy, outputs in the output dtype.  Inputs are passed
        as given (autocast semantics); call ``convert_input`` for jmp-style input casts."""
        with self.autocast():
            out = model.apply(variables, *args, **kwargs)
        if kwargs.get("mutable"):
            y, state = out
            return self.convert_output(y), state
        return self.convert_output(out)

    def setup(self, model):
        """An nnx model put under the policy, in place (params cast, layers configured)."""
        from flax import nnx

        if not isinstance(model, nnx.Module):
            raise TypeError(f"setup() takes a flax.nnx Module, got {type(model).__name__}; for linen "
                            "use prec.init(model, rng, x) and prec.apply(model, variables, x)")
        return flax_nnx.setup(model, self.policy)

    def _params_to_policy(self, variables):
        """User modules may call self.param without a dtype: the param collection is cast per path."""
        if "params" not in variables:
            return variables
        def cast(path, x):
            owner = ".".join(str(getattr(k, "key", k)) for k in path[:-1])
            return cast_floating(x, jax_dtype(self.policy.for_module(owner).param_dtype))
        return {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}

    # ----- loss scaling and the optimizer ----------------------------------------------
    def wrap_optimizer(self, tx):
        """``tx`` with this policy's loss scaling (and master weights): see `loss_scaled`."""
        return loss_scaled(tx, self.policy)

    def scale_loss(self, loss, opt_state: LossScaledState | LossScaleState):
        """The loss times the current scale (the gradient of this is what the wrapper unscales)."""
        state = opt_state.loss_scale if isinstance(opt_state, LossScaledState) else opt_state
        if not isinstance(state, LossScaleState):
            raise TypeError("scale_loss() needs the wrapped optimizer's state (or its .loss_scale), "
                            f"got {type(opt_state).__name__}")
        return scale_loss(loss, state)

    # ----- devices --------------------------------------------------------------------
    def check(self, caps: DeviceCaps | None = None) -> CheckReport:
        return self.policy.check(device_caps() if caps is None else caps)

    device_caps = staticmethod(device_caps)
