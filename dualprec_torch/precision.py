"""`Precision`: carry one dualprec Policy out in a torch training loop.

Worked example (any string `Policy.parse` takes works in place of "16-mixed")::

    precision = Precision("16-mixed")
    with precision.init_module():
        model = Net()
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = precision.setup(model, optimizer)
    for x, y in data:
        optimizer.zero_grad()
        with precision.autocast():
            out = model(precision.convert_input(x))
            loss = loss_fn(out, y)            # CUDA autocast's op table, on CPU too
        precision.backward(loss)               # loss * scale, then backward
        precision.unscale_(optimizer)          # optional: to clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        took_step = precision.step(optimizer)  # skipped when a gradient is inf/NaN
        precision.update()                     # optional, see below
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "precision": precision.state_dict()}, path)

This is GradScaler's loop, state for state: `step` unscales (unless `unscale_` did) and
steps or skips one optimizer; `update` advances the loss scale once per iteration from the
flags of every optimizer unscaled since the last update.  `update` may be left out: it runs
by itself at the next `backward` or `state_dict` once every optimizer given to `setup` has
stepped.  Reading `scale` / `loss_scale` / `last_step` changes nothing: they report the
state the next iteration starts from (this iteration's update included once every optimizer
has stepped).  With several optimizers that do not all step every iteration, call
`update()` at the end of each iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from dualprec import DeviceCaps, Policy, PolicyError, checkpoint, contract, registry
from dualprec.errors import CheckpointError, NonFiniteGradientError, UnsupportedPolicyError

from . import fp8, quant
from .caps import device_caps
from .casts import cast_floating, torch_dtype
from .loss_scale import LossScaler, LossScaleState
from .master import MasterWeights
from .modules import convert_module
from .ops import backward_context, compute_context
from .sharding import check_process_group, decision_group, local_shards, reduce_found_inf

__all__ = ["Precision", "UnsupportedPolicyError"]

#: consecutive skipped iterations before a warning that the loss scale is collapsing
SKIP_WARNING_STREAK = 25

LEGACY_FORMAT = "dualprec_torch.Precision"  # version 1: master weights as positional lists

# precision checkpoints carry the state of these feature modules (see dualprec.checkpoint)
checkpoint.register_state_extension("torch", "fp8", fp8.state_tensors, fp8.load_state_tensors)
checkpoint.register_state_extension("torch", "quant", quant.state_tensors, quant.load_state_tensors)


def _mechanism(p: Policy) -> str:
    if p.is_mixed:
        return (f"torch.autocast(dtype={p.compute_dtype}) around forward and loss: plain on CUDA; on CPU with "
                "CUDA autocast's op table (AutocastCPU kernels for the listed ops)")
    return f"module converted to {p.param_dtype}; default dtype {p.param_dtype} while building the model"


# what this backend runs, for `dualprec explain` (see dualprec.registry)
registry.register("torch", "mechanism", _mechanism)
registry.register("torch", "loss_scale", "torch.amp.GradScaler's kernels, one decision per iteration")
registry.register("torch", "master_weights", "float32 copies handed to the optimizer, rounded back into the model")
registry.register("torch", "nonfinite", "Precision.step returns whether it stepped, last_step() says why")
registry.register("torch", "reduce", "FSDP2 MixedPrecisionPolicy(reduce_dtype=...) via dualprec_torch.sharding.shard")
for _mode in ("nf4", "nf4-dq", "fp4", "fp4-dq"):
    registry.register("torch", f"quantization.{_mode}", "bitsandbytes Linear4bit (dualprec_torch.quant) replaces nn.Linear")
for _mode in ("int8", "int8-training"):
    registry.register("torch", f"quantization.{_mode}", "bitsandbytes Linear8bitLt (dualprec_torch.quant) replaces nn.Linear")
registry.register("torch", "fp8.native", "FP8Linear over torch._scaled_mm with dualprec's scale state (dualprec_torch.fp8)")
registry.register("torch", "fp8.transformer-engine", "transformer_engine.pytorch layers under te.autocast (fp8_autocast before TE 2.9; dualprec_torch.te)")


def _check_supported(policy: Policy) -> None:
    for pat, p in policy.policies():
        where = f" (override @{pat})" if pat else ""
        if p.is_mixed and p.compute_dtype not in ("bfloat16", "float16"):
            raise UnsupportedPolicyError(
                f'"{policy}"{where}: params={p.param_dtype} with compute={p.compute_dtype} needs an '
                "autocast to a wide dtype, which torch does not have (autocast computes in bfloat16 "
                "or float16); use params=compute for a single-dtype policy")


registry.register_check("torch", _check_supported)  # explain says "refused" where the constructor does


class _AutocastContext(contextlib.ContextDecorator):
    """`Precision.autocast()`: a context manager, re-entrant, and a decorator."""

    def __init__(self, precision: "Precision"):
        self._precision = precision
        self._stack: list[contextlib.AbstractContextManager] = []

    def _recreate_cm(self):
        return _AutocastContext(self._precision)  # a decorated function: a fresh context per call

    def __enter__(self):
        p = self._precision
        context = compute_context(p._policy, p.device_type)
        context.__enter__()
        self._stack.append(context)
        return None

    def __exit__(self, exc_type, exc, tb):
        context = self._stack.pop()
        if exc is not None:
            self._precision._note_dtype_error(exc)
        context.__exit__(exc_type, exc, tb)
        return False  # never swallow: the exception passes through as it is


@dataclass(eq=False)
class _OptimizerRecord:
    optimizer: torch.optim.Optimizer
    masters: MasterWeights | None
    stage: str = "ready"  # ready -> unscaled -> stepped -> (update) ready
    found_inf: dict = field(default_factory=dict)
    last: contract.StepReport = contract.StepReport("none")
    stepped_grads: list = field(default_factory=list)  # (weakref to grad, its version) after the last step


def _torch_device(device) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        why = str(e).splitlines()[0] if isinstance(e, RuntimeError) else f"a {type(device).__name__}"
        raise ValueError(f"Precision(policy, device=...): {device!r} is not a torch device ({why}); use e.g. "
                         '"cpu", "cuda", "cuda:1", a torch.device or a dualprec.DeviceCaps') from None


class _Hook:
    """A hook calling a method of a Precision by weak reference, and dropping it when pickled
    or copied: torch.save(model) / copy.deepcopy(model) carry the module's hooks, and a hook
    that held the Precision would drag it (and its optimizers) along."""

    def __init__(self, precision, method: str):
        self._ref, self._method = weakref.ref(precision), method

    def __call__(self, *args):
        precision = self._ref() if self._ref is not None else None
        return None if precision is None else getattr(precision, self._method)(*args)

    def __getstate__(self):
        return {"_ref": None, "_method": self._method}


def _same_grads(stepped: list, grads: list[torch.Tensor]) -> bool:
    """Whether ``grads`` are exactly the tensors the last step left, unchanged since (no
    backward accumulated into them, none replaced them): a second step would reapply them."""
    if len(stepped) != len(grads):
        return False
    return all(ref() is g and g._version == version for (ref, version), g in zip(stepped, grads))


def _find_nonfinite(grads: list[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """Per device, a float32 flag > 0 when some gradient is not finite (no host sync)."""
    found: dict[torch.device, torch.Tensor] = {}
    with torch.no_grad():
        for g in grads:
            bad = (~torch.isfinite(g)).any().float()
            found[g.device] = found[g.device] + bad if g.device in found else bad
    return found


class Precision(contract.Precision):
    """One Policy, carried out in torch.  See the module docstring for the training loop.

    ``device``: a torch device (or its string) or a `dualprec.DeviceCaps` to check against;
    default: the device of the model given to `setup`.  The policy is checked against the
    device's capabilities here (PolicyError naming the fallback when it cannot run).

    ``process_group``: the ranks that take one skip/step decision and one loss-scale update.
    "auto" (default): once torch.distributed is initialised with several ranks, the flags
    are all-reduced over the FSDP2 mesh, a DistributedDataParallel model's group or the
    default group, so an inf on one rank skips the step on all (every rank must then call
    `step` for the same steps); None: each rank decides alone (FSDP2 shards still agree); or
    a ProcessGroup (see `dualprec_torch.sharding.decision_group`).
    """

    def __init__(self, policy="32-true", device=None, *, process_group="auto"):
        self._process_group = check_process_group(process_group)
        self._policy = Policy.parse(policy)
        _check_supported(self._policy)
        self._caps = device if isinstance(device, DeviceCaps) else None
        self._device = None if self._caps is not None else _torch_device(device)
        self._device_type = self._device.type if self._device is not None else None
        if self._caps is None:
            self._caps = device_caps(self._device)
        self._policy.check(self._caps).raise_if_unrunnable()
        self._model_seen = False  # setup / convert_module / init_module ran
        self._n_models = 0         # models converted here (a second one's names get a prefix)
        self._model = None
        self._scaler = LossScaler(self._policy.loss_scale)
        self._records: dict[int, _OptimizerRecord] = {}
        self._names: dict[int, str] = {}
        self._scaled_backward = False  # precision.backward ran since the last update
        self._pending = False          # an optimizer stepped since the last update
        self._in_step = False          # precision.step is calling optimizer.step
        self._last_output = None
        self._skip_streak = 0          # consecutive iterations whose steps were skipped
        self._warned: set[str] = set()  # warnings given once per Precision

    # ----- policy and device ----------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def device_type(self) -> str:
        if self._device_type is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self._device_type

    @property
    def caps(self) -> DeviceCaps:
        return self._caps

    def check(self, device=None):
        """`policy.check` on this device's capabilities: a `dualprec.CheckReport`."""
        if device is None:
            return self._policy.check(self._caps)
        return self._policy.check(device if isinstance(device, DeviceCaps) else device_caps(device))

    def __repr__(self) -> str:
        return f'Precision("{self._policy}")'

    # ----- modules ----------------------------------------------------------------------
    def init_module(self, empty_init: bool = False):
        """Context: modules created inside get the param dtype (and device) directly."""
        self._model_seen = True
        return fp8.init_context(self._policy, quant.module_init_context(self._policy, self._device,
                                                                        self.device_type, empty_init))

    def convert_module(self, model: nn.Module) -> nn.Module:
        """Cast ``model`` to the policy (per-module overrides included) and return it: the
        parameters are cast in place; quantized, FP8 and block-scaled layers are swapped into
        their parents as new modules, so use the returned model (it differs from ``model``
        when ``model`` is itself a layer that gets swapped)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"convert_module(model): expected a torch.nn.Module, got {type(model).__name__}")
        self._policy.check_overrides_match((n for n, _ in model.named_modules()), "dualprec_torch setup")
        self._model_seen = True
        if self._device_type is None:
            first = next(iter(model.parameters()), None)
            if first is not None:
                self._device_type = first.device.type
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in self._names]
        taken = set(self._names.values())
        # a second model under the same Precision (Fabric sets up each one): its names are
        # qualified where they would collide, so master weights keep one entry per parameter
        prefix = f"model{self._n_models}." if any(n in taken for n, _ in named) else ""
        for name, p in named:
            self._names[id(p)] = prefix + name
        self._n_models += 1
        if self._policy.uses_quantization:  # Linear -> bitsandbytes layers, quantized
            quant.quantize_module(model, self._policy, self._device)
        model = fp8.convert_module(model, self._policy)  # first: its int32 state buffers ignore the casts
        return convert_module(model, self._policy, self.device_type)

    def setup(self, model: nn.Module, *optimizers: torch.optim.Optimizer):
        """Convert ``model`` and adopt ``optimizers``; returns the model, or (model, *optimizers)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"setup(model, *optimizers): model must be an nn.Module, got {type(model).__name__}")
        model_params = {id(p) for p in model.parameters()}
        model = self.convert_module(model)
        self._model = model
        if self._policy.is_mixed:
            model.register_forward_pre_hook(_Hook(self, "_check_forward_in_autocast"))
        for opt in optimizers:  # quantization replaced Linear weights: point the optimizers at the new ones
            quant.rebind_optimizer(opt, model)
        model_params |= {id(p) for p in model.parameters()}
        for opt in optimizers:
            self._adopt(opt, model_params)
        return model if not optimizers else (model, *optimizers)

    def _check_forward_in_autocast(self, module, args) -> None:
        if "forward" in self._warned:
            return
        first = next(module.parameters(), None)
        where = first.device.type if first is not None and first.device.type != "meta" else self.device_type
        if torch.is_autocast_enabled(where):
            return
        self._warned.add("forward")
        p = self._policy
        if where != self.device_type and torch.is_autocast_enabled(self.device_type):
            warnings.warn(f'"{p}": the model is on {where} but this Precision autocasts {self.device_type}, so its '
                          f"forward computed in {p.param_dtype}, not {p.compute_dtype}; pass device=\"{where}\" "
                          f"to the Precision, or move the model to {self.device_type} (warned once)",
                          UserWarning, stacklevel=3)
            return
        warnings.warn(f'"{p}": the model ran outside precision.autocast(), so its forward computed in '
                      f"{p.param_dtype}, not {p.compute_dtype}; run forward and loss inside "
                      "`with precision.autocast():` (warned once; ignore it for a deliberate float32 pass)",
                      UserWarning, stacklevel=3)

    def _direct_step_hook(self, optimizer, args, kwargs) -> None:
        if self._in_step or all(float(g.get("lr", 1.0)) == 0.0 for g in optimizer.param_groups):
            return  # a step that moves nothing: torch.distributed.checkpoint's state initialisation
        why = (f"the gradients are still multiplied by the loss scale ({self._scaler.scale:g})"
               if self._scaler.enabled else "the float32 master weights have no gradients yet")
        raise RuntimeError(f'optimizer.step() called directly under "{self._policy}": {why}; call '
                           "precision.step(optimizer) instead (it unscales, moves gradients to the master "
                           "weights, skips inf/NaN steps and advances the loss scale)")

    def _adopt(self, opt, model_params: set[int]) -> None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"setup(model, *optimizers): expected torch.optim.Optimizer, got {type(opt).__name__}")
        if id(opt) in self._records:
            return
        if isinstance(opt, torch.optim.LBFGS) and self._scaler.enabled:
            raise TypeError("LBFGS re-evaluates the loss in step(closure), which loss scaling cannot see; "
                            "use another optimizer or a policy without loss scaling")
        foreign = [p for g in opt.param_groups for p in g["params"] if id(p) not in model_params]
        if foreign:
            raise ValueError(f"setup(): the optimizer holds {len(foreign)} parameter(s) that are not in the "
                             "model passed with it; build the optimizer from model.parameters()")
        masters = MasterWeights(opt) if self._policy.master_weights else None
        for p, master in masters.pairs if masters is not None else ():
            self._names[id(master)] = self._names.get(id(p), "a parameter not in the model")  # its gradient's name
        self._records[id(opt)] = _OptimizerRecord(opt, masters)
        if self._scaler.enabled or masters is not None:  # a direct optimizer.step() would be wrong
            opt.register_step_pre_hook(_Hook(self, "_direct_step_hook"))

    # ----- forward ----------------------------------------------------------------------
    def autocast(self):
        """Context for forward and loss.  Mixed policies: torch's CUDA autocast op table
        (plain ``torch.autocast`` on CUDA; on CPU the CUDA lists emulated, so exp, pow,
        rsqrt, softmax, norms, sums and losses return float32 while mean/var/std stay in
        the compute dtype).  "-true" policies: the compute dtype as default dtype.

        Also a decorator (``@precision.autocast()``): each call of the function runs in a
        fresh context.  Exceptions leave it unchanged (same object, same type); a dtype clash
        when no model was put under this Precision gets a note saying what is missing."""
        return _AutocastContext(self)

    def _note_dtype_error(self, err: BaseException) -> None:
        """A dtype clash inside autocast when no model was put under this Precision is the
        model left in float32: add a note saying so to torch's bare "mat1 and mat2" message."""
        if self._model_seen or not isinstance(err, RuntimeError) or "dtype" not in str(err):
            return
        note = (f'dualprec: "{self._policy}" computes with {self._policy.param_dtype} parameters, but no model '
                "was put under this Precision: expected model = precision.setup(model, ...) (or the model "
                "built inside precision.init_module()) before autocast()")
        if note not in getattr(err, "__notes__", ()):
            err.add_note(note)

    def convert_input(self, data):
        """Floating tensors in ``data`` (nested) cast to the compute dtype."""
        return cast_floating(data, torch_dtype(self._policy.compute_dtype))

    def convert_output(self, data):
        """Floating tensors in ``data`` (nested) cast to the output dtype."""
        return cast_floating(data, torch_dtype(self._policy.output_dtype))

    # ----- backward and the optimizer step ------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` as GradScaler.scale forms it (``loss`` itself without loss scaling)."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"expected the loss as a torch.Tensor (the output of the loss function), got "
                            f"{type(loss).__name__} {loss!r}" if isinstance(loss, (int, float)) else
                            f"expected the loss as a torch.Tensor, got {type(loss).__name__}")
        return self._scaler.scale_loss(loss) if self._scaler.enabled else loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """``(loss * scale).backward(*args, **kwargs)`` (``gradient``, ``retain_graph``,
        ``create_graph``, ``inputs`` as ``Tensor.backward`` takes them); plain backward without
        loss scaling.  Checkpoint recomputation and ``custom_bwd`` backwards in it apply the
        policy's op table as the forward did (on CPU too)."""
        self._auto_update()  # first: the update changes the scale tensor in place
        if self._policy.uses_fp8 and getattr(self, "_fp8_before", None) is None and self._model is not None:
            # the FP8 state this iteration started from: a skipped step restores it, and
            # state_dict() reports it until a step applies the gradients (docs/fp8.md, "Steps");
            # only policies with FP8 layers have one (the walk over the modules costs every step)
            self._fp8_before = fp8.state_tensors(self._model) or None
        loss = self.scale_loss(loss)
        with backward_context():
            loss.backward(*args, **kwargs)
        self._scaled_backward = True

    def _record(self, optimizer) -> _OptimizerRecord:
        if not isinstance(optimizer, torch.optim.Optimizer):
            hint = " (the model was passed; step the optimizer)" if isinstance(optimizer, nn.Module) else ""
            raise TypeError(f"expected the torch.optim.Optimizer given to setup(), got "
                            f"{type(optimizer).__name__}{hint}")
        record = self._records.get(id(optimizer))
        if record is None or record.optimizer is not optimizer:
            raise ValueError("this optimizer was not passed to setup(); call "
                             "model, optimizer = precision.setup(model, optimizer) before training")
        return record

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale ``optimizer``'s gradients in place (for clipping) and note whether they are
        finite.  With master weights the gradients move onto the float32 copies first."""
        record = self._record(optimizer)
        if record.stage == "stepped":
            self._auto_update()  # a new iteration when every optimizer has stepped
        if record.stage == "unscaled":
            raise RuntimeError("unscale_() was already called for this optimizer in this iteration")
        if record.stage == "stepped":
            raise RuntimeError("unscale_() after step() for this optimizer while other optimizers have not "
                               "stepped: call precision.update() at the end of each iteration")
        if record.masters is not None:
            record.masters.move_grads()
        grads = self._grads(optimizer)
        if grads and _same_grads(record.stepped_grads, grads):
            raise RuntimeError("step() twice for this optimizer with no backward in between: its gradients are "
                               "the ones the last step already applied; call precision.step(optimizer) once "
                               "per backward (zero_grad, forward, precision.backward(loss), step)")
        if not grads:  # nothing to unscale: optimizer.step() leaves parameters without gradients alone
            if "no grads" not in self._warned:
                self._warned.add("no grads")
                warnings.warn("step(): no parameter of this optimizer has a gradient, so the step changes "
                              "nothing; call precision.backward(loss) before step (warned once; fine for an "
                              "optimizer deliberately left out of this iteration)", UserWarning, stacklevel=3)
            record.found_inf, record.stage = {}, "unscaled"
            return
        if self._scaler.enabled and not self._scaled_backward:
            raise RuntimeError("step()/unscale_() before precision.backward(loss): with loss scaling on, "
                               "loss.backward() alone leaves the gradients unscaled and the step would be "
                               "wrong; call precision.backward(loss) instead")
        shards, group = local_shards(grads)  # FSDP2: this rank's shard of each gradient
        group = decision_group(group, self._model, self._process_group)  # FSDP2's mesh, DDP's or the default group
        if self._scaler.enabled:
            record.found_inf = self._scaler.unscale_(shards)
        elif self._policy.nonfinite_rule != "apply":
            record.found_inf = _find_nonfinite(shards)
        if record.found_inf:
            record.found_inf = reduce_found_inf(record.found_inf, group)  # one decision for all ranks
        record.stage = "unscaled"

    def _grads(self, optimizer) -> list[torch.Tensor]:
        grads = []
        scaled = self._scaler.enabled  # once: a property, and this runs twice per step over every parameter
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if scaled and p.grad.dtype == torch.float16:
                    name = self._names.get(id(p), "a parameter")
                    raise PolicyError(f"loss scaling cannot unscale float16 gradients ({name} is float16): "
                                      "keep float32 params (16-mixed) or add master=true to the policy")
                if p.grad.is_sparse:
                    grads.append(p.grad._values())
                else:
                    grads.append(p.grad)
        return grads

    def step(self, optimizer: torch.optim.Optimizer, **kwargs) -> bool:
        """Unscale (unless done) and step ``optimizer``; skip the step when a gradient is not
        finite.  Returns whether the step was taken."""
        record = self._record(optimizer)
        if record.stage == "stepped":
            self._auto_update()  # a new iteration when every optimizer has stepped
        if record.stage == "stepped":
            raise RuntimeError("step() was already called for this optimizer since the last update; call "
                               "precision.update() at the end of each iteration (needed when several "
                               "optimizers do not all step every iteration)")
        if kwargs.get("closure") is not None:
            self._check_closure(record)
        elif record.stage == "ready":
            self.unscale_(optimizer)
        finite = all(f.item() == 0 for f in record.found_inf.values())
        output = None
        if finite:
            self._in_step = True
            try:
                output = optimizer.step(**kwargs)
            finally:
                self._in_step = False
            if record.masters is not None:
                record.masters.copy_to_model()
        before = getattr(self, "_fp8_before", None)
        if before is not None and not finite:
            fp8.load_state_tensors(self._model, before)  # a skipped step is no FP8 recipe step
        self._fp8_before = None
        record.stage = "stepped"
        record.stepped_grads = [(weakref.ref(g), g._version) for g in self._grads(optimizer)]
        self._last_output = output  # what optimizer.step returned (a closure's loss), for Fabric
        self._pending = True
        bad = None if finite else self._first_nonfinite(optimizer)
        record.last = contract.StepReport("applied" if finite else "skipped", nonfinite_parameter=bad)
        if not finite and self._policy.nonfinite_rule == "raise":
            raise NonFiniteGradientError(
                f"nonfinite=raise: the gradient of {bad} is not finite (inf/NaN"
                + (f" at loss scale {self._scaler.scale:g}" if self._scaler.enabled else "")
                + "); the step was skipped", parameter=bad)
        return finite

    def _check_closure(self, record: _OptimizerRecord) -> None:
        """optimizer.step(closure): the closure computes the gradients inside the optimizer's
        step, where no unscaling, master-weight move or inf/NaN check can reach them."""
        if self._scaler.enabled or record.masters is not None:
            what = "loss scaling" if self._scaler.enabled else "master weights"
            raise RuntimeError(f'step(optimizer, closure=...) under "{self._policy}": the closure computes the '
                               f"gradients inside optimizer.step(), out of reach of {what}; call "
                               "precision.backward(loss) and precision.step(optimizer) without a closure, or use "
                               "a policy without " + what)
        if record.stage == "ready":
            record.found_inf, record.stage = {}, "unscaled"

    def _first_nonfinite(self, optimizer) -> str | None:
        """The name of the first parameter whose gradient is not finite, the same on every
        rank: under FSDP2 (or DDP) each rank looks at its own shards (gradients) and the ranks
        agree on the lowest index (a rank whose gradients are all finite still names the bad
        parameter)."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        shards, group = local_shards([p.grad for p in params])
        group = decision_group(group, self._model, self._process_group)
        first = next((i for i, g in enumerate(shards) if not bool(torch.isfinite(g).all())), len(params))
        if group is not None:
            index = torch.tensor([first], dtype=torch.int64, device=shards[0].device)  # NCCL: on the GPU
            torch.distributed.all_reduce(index, op=torch.distributed.ReduceOp.MIN, group=group)
            first = int(index.item())
        return self._names.get(id(params[first]), "a parameter not in the model") if first < len(params) else None

    def last_step(self, optimizer=None) -> contract.StepReport:
        """What the last `step` of ``optimizer`` (default: the only one) did; ``scale`` is the
        loss scale after this iteration's update (`scale`; reading it changes nothing)."""
        if optimizer is None:
            if len(self._records) != 1:
                raise TypeError(f"last_step(): {len(self._records)} optimizers are set up; pass the one you mean")
            record = next(iter(self._records.values()))
        else:
            record = self._record(optimizer)
        return dataclasses.replace(record.last, scale=self.scale)

    def update(self) -> None:
        """Advance the loss scale once for this iteration (a no-op when nothing stepped)."""
        if not self._pending:
            return
        self._scaler.update(self._found_infs())
        self._note_skips([r for r in self._records.values() if r.stage == "stepped"])
        for r in self._records.values():
            r.stage, r.found_inf = "ready", {}
        self._pending = False
        self._scaled_backward = False

    def _note_skips(self, stepped: list[_OptimizerRecord]) -> None:
        if not stepped:
            return
        if any(r.last.outcome == "applied" for r in stepped):
            self._skip_streak = 0
            return
        self._skip_streak += 1
        if self._skip_streak == SKIP_WARNING_STREAK and "skips" not in self._warned:
            self._warned.add("skips")
            scale = f"; the loss scale fell to {self._scaler.scale:g}" if self._scaler.enabled else ""
            warnings.warn(f"{self._skip_streak} consecutive steps skipped for inf/NaN gradients{scale}. A lower "
                          "scale cannot fix a NaN: check the inputs and the loss for NaN/inf, a diverged "
                          "learning rate, or an op overflowing in forward (try bf16-mixed, or an @module=32-true "
                          "override); precision.last_step(optimizer) names the first bad parameter",
                          RuntimeWarning, stacklevel=3)

    def _update_due(self) -> bool:
        """Every optimizer stepped since the last update: the next backward runs it."""
        return self._pending and all(r.stage == "stepped" for r in self._records.values())

    def _found_infs(self) -> list[torch.Tensor]:
        return [f for r in self._records.values() if r.stage != "ready" for f in r.found_inf.values()]

    def _auto_update(self) -> None:
        if self._update_due():
            self.update()

    def _next_loss_scale(self):
        """The loss-scale state the next iteration starts from, read without changing any."""
        return self._scaler.peek(self._found_infs() if self._update_due() else None)

    # ----- state ------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The loss scale the next iteration multiplies by (1.0 without loss scaling); this
        iteration's update is included once every optimizer has stepped.  Reading it changes
        nothing."""
        return float(self._next_loss_scale().scale.item())

    @property
    def loss_scale(self) -> LossScaleState:
        """A copy of the `dualprec_torch.LossScaleState` (scale, counter: 0-dim tensors) the
        next iteration starts from, as `scale` reads it; reading it changes nothing."""
        return self._next_loss_scale()

    def state_dict(self) -> dict:
        """The precision state (`dualprec.checkpoint`'s backend-neutral form): policy, loss
        scale, the float32 master weights by parameter name, and registered extensions' state.
        `dualprec.checkpoint.save_state(path, precision.state_dict())` writes it pickle-free."""
        self._auto_update()
        if self._pending:
            raise RuntimeError("state_dict() in the middle of an iteration (some optimizers stepped, others "
                               "not): call precision.update() first")
        masters = {}
        for r in self._records.values():
            if r.masters is not None:
                for p, master in r.masters.pairs:
                    masters[self._names.get(id(p), f"param{len(masters)}")] = master.detach()
        extensions = {}
        if self._model is not None:
            for name, ext in checkpoint.state_extensions("torch").items():
                tensors = ext.state_tensors(self._model)
                if name == "fp8" and getattr(self, "_fp8_before", None) is not None:
                    tensors = self._fp8_before  # a backward whose gradients were not applied yet
                if tensors:  # tensors only, so torch.load(weights_only=True) reads a torch.save of it
                    extensions[name] = {k: quant.to_torch(v) for k, v in tensors.items()}
        return checkpoint.new_state(self._policy, self._scaler.scale, self._scaler.counter, masters, extensions)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore `state_dict()` (from either backend).  ``strict``: the saved policy must equal
        this one, and every saved master weight and extension must have a place here."""
        if isinstance(state, dict) and state.get("format") == LEGACY_FORMAT:
            state = self._from_legacy(state)
        saved = checkpoint.check_state(state, self._policy, strict)
        if self._scaler.enabled and saved.loss_scale.enabled:
            self._scaler.load_state_dict(checkpoint.clamped_loss_scale(state["loss_scale"], self._policy))
        if self._policy.master_weights and saved.master_weights:
            self._load_masters(state.get("master_weights", {}), strict)
        self._load_extensions(state.get("extensions", {}), strict)
        self._fp8_before = None
        for r in self._records.values():
            r.stage, r.found_inf = "ready", {}
            r.last = contract.StepReport("none")  # no step since the load
        self._pending = self._scaled_backward = False

    def _load_masters(self, saved: dict, strict: bool) -> None:
        here = {self._names.get(id(p)): (p, master) for r in self._records.values() if r.masters is not None
                for p, master in r.masters.pairs}
        missing, unexpected = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
        if strict and (missing or unexpected):
            raise CheckpointError(f"master weights: missing in the checkpoint: {missing or 'none'}; not in the "
                                  f"optimizers set up here: {unexpected or 'none'}; call setup(model, *optimizers) "
                                  "with the same model before load_state_dict")
        with torch.no_grad():
            for name, (p, master) in here.items():
                if name not in saved:
                    continue
                value = torch.as_tensor(saved[name])
                if tuple(value.shape) != tuple(master.shape):
                    raise CheckpointError(f"master weight {name}: shape {tuple(value.shape)} in the checkpoint, "
                                          f"{tuple(master.shape)} here")
                master.copy_(value)
                p.copy_(master)
        for r in self._records.values():
            if r.masters is not None:
                r.masters._checked = True

    def _load_extensions(self, saved: dict, strict: bool) -> None:
        for ext, tensors in checkpoint.loadable_extensions("torch", saved, strict):
            if self._model is None:
                raise CheckpointError(f"the checkpoint carries {ext.name!r} state: call setup(model, ...) before "
                                      "load_state_dict so it has a model to go into")
            ext.load_state_tensors(self._model, tensors)

    def _from_legacy(self, state: dict) -> dict:
        """Version 1 (this backend only): master weights as one positional list per optimizer."""
        masters = {}
        lists = state.get("master_weights", [])
        records = [r for r in self._records.values() if r.masters is not None]
        if lists and len(lists) != len(records):
            raise CheckpointError(f"master weights for {len(lists)} optimizer(s) in the checkpoint, "
                                  f"{len(records)} set up here; call setup(model, *optimizers) with the same "
                                  "optimizers before load_state_dict")
        for r, tensors in zip(records, lists):
            if len(tensors) != len(r.masters.pairs):
                raise CheckpointError(f"master weights: the checkpoint holds {len(tensors)} tensors, this "
                                      f"optimizer has {len(r.masters.pairs)} half-precision parameters")
            for (p, _), t in zip(r.masters.pairs, tensors):
                masters[self._names.get(id(p))] = t
        return dict(checkpoint.new_state(state["policy"], state["loss_scale"]["scale"],
                                         state["loss_scale"]["counter"], masters), version=1)

    def load_grad_scaler_state(self, state: dict) -> None:
        """Take over a torch.amp.GradScaler's state (scale and growth tracker): pass
        ``scaler.state_dict()``."""
        if isinstance(state, torch.amp.GradScaler):
            raise TypeError("load_grad_scaler_state() expects the GradScaler's state dict: pass "
                            "scaler.state_dict(), not the GradScaler itself")
        if not isinstance(state, dict) or "scale" not in state or "_growth_tracker" not in state:
            raise TypeError("load_grad_scaler_state() expects torch.amp.GradScaler.state_dict() (a dict with "
                            f"'scale' and '_growth_tracker'), got {type(state).__name__}")
        if not self._scaler.enabled:
            raise PolicyError(f'"{self._policy}" has no loss scaling; a GradScaler state has nowhere to go')
        self._scaler.load_state_dict(checkpoint.clamped_loss_scale(
            {"scale": state["scale"], "counter": state["_growth_tracker"]}, self._policy))

    def master_params(self, optimizer) -> list[torch.Tensor]:
        """The tensors ``optimizer`` updates (float32 copies under master=true): clip these."""
        self._record(optimizer)
        return [p for g in optimizer.param_groups for p in g["params"]]

