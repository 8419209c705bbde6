"""The interface the suite drives: one Backend per framework, one Session per model run.

Everything crossing this interface is NumPy in the canonical layout (torch's: flat
``{"fc1.weight": [out, in]}`` weights, NCHW activations), so the suite never imports a
framework and a third backend only has to implement these two classes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Mapping

import numpy as np

from dualprec import Policy

from ..weights import WeightMap
from ..zoo import ModelSpec


@dataclasses.dataclass(frozen=True)
class Optim:
    """The optimizer both sides use: "sgd" (plain, lr) or "adam" (lr, default betas/eps)."""

    kind: str = "sgd"
    lr: float = 0.05


@dataclasses.dataclass
class StepInfo:
    """What one training step did.  ``scale``/``counter`` are the loss-scale state *after*
    the step (scale 1.0, counter 0 without loss scaling); ``skipped`` whether the optimizer
    step was skipped for non-finite gradients; ``opt_steps`` the optimizer's own step count
    (Adam's ``step`` / optax's ``count``), None when the optimizer keeps none."""

    loss: float
    scale: float
    counter: int
    skipped: bool
    opt_steps: int | None = None


class Session(abc.ABC):
    """One model with one policy, weights loaded, optimizer built, in one framework."""

    @abc.abstractmethod
    def param_dtypes(self) -> dict[str, str]:
        """Canonical name -> dtype name of the parameter the model computes with."""

    @abc.abstractmethod
    def params(self) -> dict[str, np.ndarray]:
        """Canonical name -> parameter values (torch layout, stored dtype)."""

    @abc.abstractmethod
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Model output after convert_output, and each named submodule's output (torch
        layout) for localising a divergence."""

    @abc.abstractmethod
    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """The float32 loss and the *unscaled* gradients (canonical names and layout)."""

    @abc.abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray, loss_multiplier: float = 1.0) -> StepInfo:
        """One optimizer step through the backend's loss scaling.  ``loss_multiplier=inf``
        injects an overflow: the scaled gradients become non-finite."""

    # -- optional: the dtype-flow and layer-isolated checks use these (skip when absent) --
    def layer_inputs(self) -> dict[str, np.ndarray]:
        """Each named submodule's first input in the last ``forward`` (canonical layout)."""
        raise NotImplementedError

    def module_kinds(self) -> dict[str, str]:
        """Named submodule -> its class name ("Linear", "LayerNorm"...)."""
        raise NotImplementedError

    def run_layers(self, x: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """For each name in ``inputs``: the model run on ``x`` with that submodule's input
        replaced by the given array; the submodule's output (canonical layout)."""
        raise NotImplementedError

    def run_glue(self, x: np.ndarray, inputs: dict[str, np.ndarray],
                 outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One pass with each block named in ``inputs`` fed that input and each submodule
        named in ``outputs`` (the blocks' direct children) returning the given array: each
        block's output then differs from the reference only by the block's own ops between
        its submodules (an activation, a softmax, a residual add).  Returns the outputs of
        the blocks all of whose given children were replaced (canonical layout)."""
        raise NotImplementedError

    def grad_dtypes(self) -> dict[str, str]:
        """Dtype of each parameter's gradient as autodiff produced it (before unscaling),
        in the last ``loss_and_grads``."""
        raise NotImplementedError

    def optimizer_state_dtypes(self) -> dict[str, str]:
        """"<param>.<state>" -> dtype of each optimizer-state tensor (Adam: exp_avg,
        exp_avg_sq), names in torch's vocabulary."""
        raise NotImplementedError

    # -- optional: quantized policies (the quant-codes check; skip when absent) --
    def quant_frozen(self) -> set[str]:
        """Canonical names of the weights that are frozen quantized codes (not parameters
        the model trains or ``params()`` returns); empty for an unquantized model."""
        return set()

    def quant_state(self) -> dict[str, np.ndarray]:
        """The quantized layers' tensors in bitsandbytes' state-dict layout (packed codes,
        absmax, nested state, quant_map, the quant_state JSON as uint8, int8 codes, SCB,
        weight_format), biases left out.  int8-training layers: ``<path>.weight.int8`` and
        ``<path>.SCB``, the codes the backend's quantizer makes from the current weight."""
        raise NotImplementedError

    def dequantized(self) -> dict[str, np.ndarray]:
        """Canonical weight name -> the dequantized weight [out, in] of each frozen quantized
        layer, in the dtype the backend's dequantize returns."""
        raise NotImplementedError

    def frozen_with_grad(self) -> list[str]:
        """Frozen quantized weights that received a gradient in the last ``loss_and_grads``
        (must be none)."""
        return []

    def fp8_state(self) -> dict[str, np.ndarray]:
        """The FP8 delayed-scaling state, ``fp8.<layer>.<role>.<scale|amax_history>``."""
        raise NotImplementedError


class Backend(abc.ABC):
    """``package`` names the dualprec backend whose ``Precision`` this drives;
    ``precision_cls`` replaces that class (tests pass a stand-in)."""

    name: str = "?"
    package: str = "?"

    def __init__(self, precision_cls=None):
        self._cls = precision_cls

    def precision(self, policy: Policy):
        cls = self._cls or importlib.import_module(self.package).Precision
        return cls(policy)

    def unsupported(self, policy: Policy) -> str | None:
        """Why this backend cannot run ``policy`` here (None when it can): the reason its
        Precision gives when built (PolicyError is a ValueError; JAX refuses float64 without
        x64 with a RuntimeError)."""
        if self._cls is None:
            try:
                importlib.import_module(self.package).Precision
            except Exception:  # noqa: BLE001 - a broken backend is an error, never a skip
                return None  # the checks run and report the import failure as error records
        try:
            self.precision(policy)
        except ImportError as e:  # an optional dependency (an extra) missing here
            return f"{self.package} needs a package that is not installed: {e}"
        except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:
            return f"{self.package} does not run this policy: {e}"
        return None

    def float32_matmul_mode(self) -> str:
        """How this backend computes float32 matmuls here: "ieee" (strict float32 products),
        "tf32" (operands rounded to 10 mantissa bits, NVIDIA Ampere and later) or "bf16"
        (bfloat16 passes).  The suite compares two backends only in the same mode."""
        return "ieee"

    def block_parts(self, x: np.ndarray, w: np.ndarray, g: np.ndarray, recipe, seed: int,
                    step: int) -> dict[str, np.ndarray]:
        """A block-scaled recipe's GEMM operands on the given float32 operands (``x`` (M, K),
        the weight ``w`` (N, K), the output gradient ``g`` (M, N)) at precision state
        ``[seed, step]``: every code and scale (``<operand>_q``/``_s``/``_ts``) and the
        results ``y``/``dx``/``dw``, as the backend's block-scaled layers compute them."""
        raise NotImplementedError

    @abc.abstractmethod
    def convert_input(self, policy: Policy, x: np.ndarray) -> np.ndarray:
        """What the backend's Precision does to a floating input."""

    @abc.abstractmethod
    def convert_output(self, policy: Policy, x: np.ndarray) -> np.ndarray:
        """What the backend's Precision does to a floating model output."""

    @abc.abstractmethod
    def session(self, spec: ModelSpec, policy: Policy, weights: Mapping[str, np.ndarray],
                weight_map: WeightMap, optim: Optim) -> Session:
        """Build the model under ``policy`` with ``weights`` (canonical, float32)."""
