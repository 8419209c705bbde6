"""The one `Precision` interface that `dualprec_torch.Precision` and `dualprec_jax.Precision`
implement: the same constructor, the same names, the same step report and checkpoint state.

Where the frameworks differ in kind the names stay and the arguments follow the framework:
torch keeps its training state (loss scale, master weights) inside the Precision object and
the optimizer; JAX keeps it in the wrapped optimizer's state pytree, so the JAX verbs take
and return that state.  `FRAMEWORK_SPECIFIC` lists every public name only one side has, and
why; ``tests/contract/test_parity.py`` fails when a name appears on one side alone without an
entry there.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

from .capabilities import CheckReport, DeviceCaps
from .policy import Policy

__all__ = ["Precision", "StepReport", "FRAMEWORK_SPECIFIC", "STEP_OUTCOMES"]

#: what an optimizer step did: "applied" (finite, or not looked at under nonfinite=apply),
#: "skipped" (non-finite gradients: parameters and optimizer state unchanged),
#: "none" (no step since the Precision was built or loaded)
STEP_OUTCOMES = ("applied", "skipped", "none")


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What the last optimizer step did.  ``nonfinite_parameter``: the first parameter (in
    the optimizer's order) whose gradient was not finite, when the step looked; ``scale``:
    the loss scale after the step (1.0 without loss scaling)."""

    outcome: str
    scale: float = 1.0
    nonfinite_parameter: str | None = None

    @property
    def taken(self) -> bool:
        return self.outcome == "applied"

    def __bool__(self) -> bool:
        return self.taken


class Precision(abc.ABC):
    """One Policy carried out by one framework.

    ``Precision(policy, device=None, **options)``: ``policy`` is anything `Policy.parse`
    takes; ``device`` is the framework's device (a torch device or its string, a JAX device
    or its platform name) or a `dualprec.DeviceCaps` to check against; options are keywords
    of the backend.  A policy the device cannot run, or a feature the backend does not carry
    out, is refused here (`PolicyError` / `UnsupportedPolicyError`), never at the first step.
    """

    @property
    @abc.abstractmethod
    def policy(self) -> Policy:
        """The Policy (read-only: build another Precision for another policy)."""

    @property
    @abc.abstractmethod
    def caps(self) -> DeviceCaps:
        """The capabilities of the device this Precision was checked against."""

    @abc.abstractmethod
    def check(self, device=None) -> CheckReport:
        """The policy's capability check on ``device`` (default: this Precision's device)."""

    @abc.abstractmethod
    def init_module(self):
        """Context manager: parameters created inside get the policy's param dtype."""

    @abc.abstractmethod
    def setup(self, model, *args):
        """Put ``model`` under the policy (torch: and adopt the optimizers)."""

    @abc.abstractmethod
    def autocast(self):
        """Context manager for forward and loss: the op policy of the compute dtype."""

    @abc.abstractmethod
    def convert_input(self, data):
        """Floating leaves of ``data`` cast to the compute dtype."""

    @abc.abstractmethod
    def convert_output(self, data):
        """Floating leaves of ``data`` cast to the output dtype."""

    @abc.abstractmethod
    def scale_loss(self, loss, *state):
        """The loss times the current loss scale (the loss itself without loss scaling)."""

    @abc.abstractmethod
    def step(self, *args, **kwargs):
        """One optimizer step under the non-finite rule (`Policy.nonfinite_rule`)."""

    @abc.abstractmethod
    def last_step(self, *state) -> StepReport:
        """What the last `step` did (torch: per optimizer; JAX: read from the optimizer state)."""

    @abc.abstractmethod
    def state_dict(self, *state) -> dict:
        """The backend-neutral precision state (`dualprec.checkpoint.new_state`)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict, *args, strict: bool = True, **kwargs) -> Any:
        """Restore `state_dict`; another policy's state is refused unless ``strict=False``."""

    def __repr__(self) -> str:
        return f'{type(self).__module__.split(".")[0]}.Precision("{self.policy}")'


#: public names only one backend has -> why
FRAMEWORK_SPECIFIC: dict[str, dict[str, str]] = {
    "torch": {
        "device_type": "torch autocast needs the device type string; JAX places arrays itself",
        "convert_module": "torch modules are cast in place; JAX parameters are values cast by init/setup",
        "backward": "torch computes gradients by loss.backward(); JAX by jax.grad of a function",
        "unscale_": "GradScaler's in-place unscale before clipping; JAX unscales inside the wrapped optimizer",
        "update": "GradScaler's once-per-iteration scale update over several optimizers; the JAX "
                  "optimizer wrapper updates the scale in its own update",
        "scale": "the loss scale lives in the torch Precision; in JAX it is in the optimizer state "
                 "(last_step(opt_state).scale)",
        "loss_scale": "the LossScaleState the torch Precision holds; in JAX the same type is opt_state.loss_scale",
        "load_grad_scaler_state": "takes over a torch.amp.GradScaler's state; JAX has no GradScaler",
        "master_params": "the float32 tensors a torch optimizer updates (for clipping); JAX keeps them "
                         "in opt_state.master",
    },
    "jax": {
        "param_dtype": "jmp's vocabulary (JAX dtype objects)",
        "compute_dtype": "jmp's vocabulary (JAX dtype objects)",
        "output_dtype": "jmp's vocabulary (JAX dtype objects)",
        "cast_to_param": "jmp's pytree cast; torch casts modules with convert_module",
        "cast_to_compute": "jmp's pytree cast (convert_input is the shared name)",
        "cast_to_output": "jmp's pytree cast (convert_output is the shared name)",
        "to_jmp": "export to a jmp.Policy, a JAX library",
        "init": "linen's functional model.init; torch modules initialise when built (init_module)",
        "apply": "linen's functional model.apply (nnx: the call plus the output cast); a torch module "
                 "is called directly, convert_output casts its outputs",
        "wrap_optimizer": "optax transformations are values to wrap; torch optimizers are adopted by setup",
        "device_caps": "JAX's device_caps(device) helper, kept as a static method for jmp-style use",
    },
}
