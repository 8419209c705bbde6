"""A Lightning Fabric precision plugin built from any dualprec Policy.

    from lightning.fabric import Fabric
    from dualprec_torch.fabric import DualprecPrecision

    fabric = Fabric(accelerator="cpu", plugins=[DualprecPrecision("bf16-mixed")])
    model, optimizer = fabric.setup(model, optimizer)   # convert_module: params to the policy
    loss = loss_fn(model(x), y)                         # Fabric's forward: autocast + convert_output
    fabric.backward(loss)                               # loss scaling, when the policy has it
    optimizer.step()                                    # unscale, skip non-finite steps, update
    fabric.save(path, {"model": model, "optimizer": optimizer, "precision": fabric.strategy.precision})

Every hook delegates to one `dualprec_torch.Precision`, so a Fabric run and a plain torch
loop under the same policy compute the same numbers.  Unlike Fabric's own plugins, one
plugin carries quantization, overrides and loss scaling together.  The plugin's state
(loss scale, master weights) is saved and restored when it is passed in Fabric's state
dict, as above: Fabric calls ``state_dict``/``load_state_dict`` on it.
"""

from __future__ import annotations

from typing import Any

from dualprec import Policy

from .precision import Precision

try:  # lightning is optional: the plugin is importable only with it
    from lightning.fabric.plugins.precision import Precision as _FabricPrecision
except ImportError as e:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError('dualprec_torch.fabric needs Lightning: pip install "lightning>=2.2"') from e

__all__ = ["DualprecPrecision"]


class DualprecPrecision(_FabricPrecision):
    """Fabric's precision hooks carried out by `dualprec_torch.Precision` for ``policy``."""

    def __init__(self, policy: Any, device=None):
        self._dp = Precision(policy, device=device)
        self.precision = str(self._dp.policy)  # Fabric reads this attribute for display
        self._model_params: set[int] = set()

    @property
    def policy(self) -> Policy:
        return self._dp.policy

    @property
    def dualprec(self) -> Precision:
        """The `dualprec_torch.Precision` behind the hooks (its ``scale``, ``check()``...)."""
        return self._dp

    def __repr__(self) -> str:
        return f'DualprecPrecision("{self.precision}")'

    # ----- modules and tensors ---------------------------------------------------------
    def convert_module(self, module):
        self._model_params |= {id(p) for p in module.parameters()}
        return self._dp.convert_module(module)

    def module_init_context(self):
        return self._dp.init_module()

    def tensor_init_context(self):
        return self._dp.init_module()

    # ----- forward ---------------------------------------------------------------------
    def forward_context(self):
        return self._dp.autocast()

    def convert_input(self, data):
        return self._dp.convert_input(data)

    def convert_output(self, data):
        return self._dp.convert_output(data)

    # ----- backward and the optimizer step ------------------------------------------------
    def backward(self, tensor, model, *args, **kwargs) -> None:
        self._dp.backward(tensor, *args, **kwargs)

    def _adopted(self, optimizer):
        # Fabric never shows the plugin its optimizers at setup: adopt each at first use.
        self._dp._adopt(optimizer, self._model_params)  # a no-op for an adopted optimizer
        return optimizer

    def optimizer_step(self, optimizer, **kwargs) -> bool:
        """Unscale, step unless a gradient is not finite, advance the loss scale.  Returns
        whether the step was taken (Fabric passes the value through ``optimizer.step()``)."""
        return self._dp.step(self._adopted(optimizer), **kwargs)

    def unscale_gradients(self, optimizer) -> None:
        self._dp.unscale_(self._adopted(optimizer))

    def main_params(self, optimizer):
        return self._dp.master_params(self._adopted(optimizer))

    # ----- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self._dp.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._dp.load_state_dict(state_dict)
