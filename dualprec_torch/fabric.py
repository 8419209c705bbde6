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
loop under the same policy compute the same numbers.  Two attributes: ``plugin.precision``
is the policy's canonical string (Fabric's plugins all keep their precision string there,
and Fabric prints it), and ``plugin.torch_precision`` is the `dualprec_torch.Precision`
behind the hooks (its ``scale``, ``last_step()``, ``check()``...; ``plugin.dualprec`` is
the older name of the same object).

Fabric's conventions hold: ``optimizer.step()`` unscales and steps (or skips an inf/NaN
step); the loss scale advances once per backward (see `DualprecPrecision.optimizer_step`), so
optimizers may step in any pattern (GAN-style alternation, one left out of an iteration,
several after one backward);
``optimizer.step(closure)`` returns the closure's loss; without loss scaling a plain
``loss.backward()`` is allowed, as under Fabric's own plugins.  Unlike Fabric's own plugins, one
plugin carries quantization, overrides and loss scaling together.  The plugin's state
(loss scale, master weights) is saved and restored when it is passed in Fabric's state
dict, as above: Fabric calls ``state_dict``/``load_state_dict`` on it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from dualprec import Policy

from . import quant
from .precision import Precision, _Hook

try:  # lightning is optional: the plugin is importable only with it
    from lightning.fabric.plugins.precision import Precision as _FabricPrecision
    from lightning.fabric.wrappers import _FabricOptimizer
except ImportError as e:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError('dualprec_torch.fabric needs Lightning: pip install "lightning>=2.2"') from e

__all__ = ["DualprecPrecision"]


def _fabric_empty_init() -> bool:
    try:
        from lightning.fabric.utilities.init import _EmptyInit
        from torch.overrides import _get_current_function_mode_stack
    except ImportError:  # pragma: no cover - older Lightning/torch
        return False
    return any(isinstance(m, _EmptyInit) and getattr(m, "enabled", False)
               for m in _get_current_function_mode_stack())


class DualprecPrecision(_FabricPrecision):
    """Fabric's precision hooks carried out by `dualprec_torch.Precision` for ``policy``."""

    def __init__(self, policy: Any, device=None, *, process_group="auto"):
        self._dp = Precision(policy, device=device, process_group=process_group)
        self.precision = str(self._dp.policy)  # Fabric reads this attribute for display
        self._model_params: set[int] = set()
        self._modules: list = []
        self._deferred_state: dict | None = None  # loaded before the optimizers it needs were adopted
        self._allow_plain_backward()

    def _allow_plain_backward(self) -> None:
        if self._dp._scaler.enabled:
            return
        # Fabric refuses a plain loss.backward() when the plugin overrides backward; without
        # loss scaling it is the same backward, so ours is marked as the base class's
        def backward(tensor, model, *args, **kwargs):
            return type(self).backward(self, tensor, model, *args, **kwargs)

        backward.__wrapped__ = _FabricPrecision.backward  # what lightning's is_overridden reads
        self.backward = backward

    def __getstate__(self) -> dict:  # ddp_spawn pickles the plugin; the closure is rebuilt
        state = dict(self.__dict__)
        state.pop("backward", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._allow_plain_backward()

    @property
    def policy(self) -> Policy:
        return self._dp.policy

    @property
    def torch_precision(self) -> Precision:
        """The `dualprec_torch.Precision` behind the hooks (its ``scale``, ``last_step()``,
        ``check()``...)."""
        return self._dp

    @property
    def dualprec(self) -> Precision:
        """The older name of `torch_precision`."""
        return self._dp

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without loss scaling)."""
        return self._dp.scale

    def __repr__(self) -> str:
        return f'DualprecPrecision("{self.precision}")'

    # ----- modules and tensors ---------------------------------------------------------
    def convert_module(self, module):
        self._model_params |= {id(p) for p in module.parameters()}
        module = self._dp.convert_module(module)
        self._model_params |= {id(p) for p in module.parameters()}  # int8-training's new weights
        if self._dp.policy.is_mixed:  # a forward outside Fabric's autocast, or on another device: said once
            module.register_forward_pre_hook(_Hook(self._dp, "_check_forward_in_autocast"))
        self._modules.append(module)
        return module

    @contextlib.contextmanager
    def module_init_context(self):
        # Fabric's init_module(empty_init=True) enters its own uninitialised-memory mode around
        # this context (lightning's _EmptyInit): the policy's empty_init path follows it, so a
        # quantized layer waits for its state dict instead of quantizing uninitialised memory
        with self._dp.init_module(empty_init=_fabric_empty_init()):
            yield

    def tensor_init_context(self):
        return self._dp.init_module()

    # ----- forward ---------------------------------------------------------------------
    def forward_context(self):
        return self._dp.autocast()

    def _float32_io(self) -> bool:
        # Fabric's 32-true plugin leaves inputs and outputs as they come (a float64 batch stays
        # float64); every other Fabric plugin casts them, as dualprec does
        p = self._dp.policy
        return p.compute_dtype == p.output_dtype == "float32"

    def convert_input(self, data):
        return data if self._float32_io() else self._dp.convert_input(data)

    def convert_output(self, data):
        return data if self._float32_io() else self._dp.convert_output(data)

    # ----- backward and the optimizer step ------------------------------------------------
    def backward(self, tensor, model, *args, **kwargs) -> None:
        self._dp.update()  # the steps since the last backward close their iteration (see optimizer_step)
        self._dp.backward(tensor, *args, **kwargs)

    def _adopted(self, optimizer):
        # Fabric never shows the plugin its optimizers at setup: adopt each at first use.
        if id(optimizer) not in self._dp._records:
            for module in self._modules:  # built before quantization: point it at the new weights
                quant.rebind_optimizer(optimizer, module)
            self._dp._adopt(optimizer, self._model_params)
            self._load_deferred()
        return optimizer

    def optimizer_step(self, optimizer, **kwargs):
        """Unscale, step unless a gradient is not finite.  Returns what the optimizer's step
        returned when a closure was passed (its loss), else whether the step was taken;
        Fabric passes the value through ``optimizer.step()``.

        The loss scale advances once per backward: the steps taken since the last
        ``fabric.backward`` are one iteration, closed by the next backward (or a second step
        of the same optimizer, or ``state_dict``).  So optimizers may step in any pattern
        (GAN-style alternation, one left out), and several optimizers stepping after one
        backward are all unscaled by the scale that backward used.  Fabric's own plugin
        updates after every step instead: after an overflow in the first optimizer, the
        second is unscaled by the halved scale and steps with twice its gradient."""
        optimizer = self._adopted(optimizer)
        if self._dp._record(optimizer).stage == "stepped":
            self._dp.update()  # stepped again without a backward in between: a new iteration
        took = self._dp.step(optimizer, **kwargs)
        self._dp._auto_update()  # every optimizer has stepped: the scale is up to date at once
        return self._dp._last_output if kwargs.get("closure") is not None else took

    def unscale_gradients(self, optimizer) -> None:
        self._dp.unscale_(self._adopted(optimizer))

    def main_params(self, optimizer):
        return self._dp.master_params(self._adopted(optimizer))

    # ----- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._dp.update()  # the steps taken so far close their iteration first
        return self._dp.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore `state_dict`.  Master weights go to the optimizers they belong to: when
        Fabric loads the plugin before those optimizers were adopted (their first step or
        their own load), the state is applied as soon as they are."""
        names = set((state_dict or {}).get("master_weights") or {}) if isinstance(state_dict, dict) else set()
        if names and not names <= self._adopted_master_names():
            from dualprec import checkpoint

            checkpoint.check_state(state_dict, self._dp.policy, True)  # a wrong policy fails now
            self._deferred_state = state_dict
            return
        self._dp.load_state_dict(state_dict)

    def _adopted_master_names(self) -> set:
        return {self._dp._names.get(id(p)) for r in self._dp._records.values() if r.masters is not None
                for p, _ in r.masters.pairs}

    def _load_deferred(self) -> None:
        state = self._deferred_state
        if state is not None and set(state.get("master_weights") or {}) <= self._adopted_master_names():
            self._deferred_state = None
            self._dp.load_state_dict(state)


def _adopting_init(self, optimizer, strategy, *args, **kwargs):
    """_FabricOptimizer.__init__, with the dualprec plugin adopting the optimizer as Fabric
    wraps it (at the end of fabric.setup / setup_optimizers, after the model was converted and
    moved): under master weights its parameters become the float32 copies before fabric.load
    restores its state, so the saved float32 state is not cast to the model's half dtype."""
    precision = getattr(strategy, "precision", None)
    if isinstance(precision, DualprecPrecision):
        precision._adopted(optimizer)
    _fabric_optimizer_init(self, optimizer, strategy, *args, **kwargs)
    if "zero_grad" in vars(optimizer):  # master weights' zero_grad (it clears the model's gradients too)
        self.zero_grad = optimizer.zero_grad  # Fabric's wrapper would reach Optimizer.zero_grad by its class


_fabric_optimizer_init = _FabricOptimizer.__init__
if not getattr(_fabric_optimizer_init, "_dualprec", False):  # once, however often this module is reloaded
    _adopting_init._dualprec = True
    _FabricOptimizer.__init__ = _adopting_init
