"""`Precision`: one object that carries a dualprec Policy out in JAX, mirroring
`dualprec_torch.Precision` name for name where JAX allows.

    prec = Precision("bf16-mixed")
    variables = prec.init(model, rng, x)              # linen: params in the param dtype
    y = prec.apply(model, variables, x)               # the whole op table inside, output dtype outside
    tx = prec.wrap_optimizer(optax.adamw(1e-3))       # unscale, skip non-finite, adjust scale

    model = prec.setup(nnx_model)                     # nnx: in place, once
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import jax

from dualprec import CheckReport, DeviceCaps, Policy, PolicyError, checkpoint, contract, registry
from dualprec.errors import CheckpointError, NonFiniteGradientError, UnsupportedPolicyError

from . import flax_linen, flax_nnx, fp8, quant
from .caps import device_caps
from .casts import cast_floating, jax_dtype
from .loss_scale import LossScaleState, floating_paths, scale_loss
from .optim import NO_STEP, LossScaledOptState, _report, loss_scaled, opt_state_of

__all__ = ["Precision", "UnsupportedPolicyError"]

log = logging.getLogger("dualprec_jax")

# precision checkpoints carry the state of these feature modules (see dualprec.checkpoint)
checkpoint.register_state_extension("jax", "fp8", fp8.state_tensors, fp8.load_state_tensors)


def _mechanism(p: Policy) -> str:
    text = ("Flax modules intercepted: dot_general with preferred_element_type=float32, fp32 bias, one rounding"
            if p.compute_dtype in ("bfloat16", "float16") else f"Flax modules run in {p.compute_dtype}")
    if p.uses_mixed:
        text = ("the model traced under torch's CUDA autocast table (dualprec_jax.autocast: every jnp / jax.nn "
                "op, not only Flax layers); " + text)
    if p.needs_x64:
        text += "; turns on jax_enable_x64 (JAX computes in 32 bits otherwise)"
    return text


# what this backend runs, for `dualprec explain` (see dualprec.registry)
registry.register("jax", "mechanism", _mechanism)
registry.register("jax", "loss_scale", "loss-scaled optax wrapper (state in the optimizer state pytree)")
registry.register("jax", "master_weights", "float32 copies in the optimizer state, rounded back into the params")
registry.register("jax", "nonfinite", "recorded in the optimizer state; Precision.step / last_step report it")
registry.register("jax", "reduce", "dualprec_jax.sharding.reduce_gradients inside shard_map")
for _mode in ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training"):
    registry.register("jax", f"quantization.{_mode}", "dualprec_jax.quant QuantDense (linen) / QuantLinear (nnx): "
                      "bitsandbytes' bits, dequantized with float32 accumulation")
registry.register("jax", "fp8.native", "XLA dot_general on fp8 operands with dualprec's scale state (dualprec_jax.fp8)")
registry.register("jax", "fp8.transformer-engine", "transformer_engine.jax layers (dualprec_jax.te)")


def _unsupported_features(policy: Policy) -> list[str]:
    return []  # quantization: dualprec_jax.quant; fp8: dualprec_jax.fp8


def _check_supported(policy: Policy) -> None:
    problems = _unsupported_features(policy)
    if problems:
        raise UnsupportedPolicyError(f'dualprec_jax cannot run "{policy}" yet: ' + "; ".join(problems))


registry.register_check("jax", _check_supported)  # explain says "refused" where the constructor does


def _ensure_x64(policy: Policy, enable_x64: bool) -> None:
    if not policy.needs_x64 or jax.config.read("jax_enable_x64"):
        return
    if not enable_x64:
        raise PolicyError(f'"{policy}" uses float64, but jax_enable_x64 is off and enable_x64=False; '
                          "JAX would compute in float32. Turn x64 on or choose a 32-bit policy")
    message = (f'dualprec_jax: "{policy}" uses float64, so jax_enable_x64 is now ON for this process '
               "(JAX computes in float32 otherwise); new arrays default to 64 bits from here on")
    warnings.warn(message, stacklevel=3)  # once: not also logged, which printed it twice
    jax.config.update("jax_enable_x64", True)


def _caps_of(device) -> DeviceCaps:
    if device is None:
        return device_caps()
    if isinstance(device, DeviceCaps):
        return device
    if isinstance(device, str):
        try:
            return device_caps(jax.devices(device)[0])
        except RuntimeError as e:
            raise ValueError(f"Precision(policy, device={device!r}): JAX has no such platform here ({e}); use "
                             'e.g. "cpu", "gpu", "tpu", a jax.Device or a dualprec.DeviceCaps') from None
    if hasattr(device, "platform"):
        return device_caps(device)
    raise TypeError(f"Precision(policy, device=...): expected a jax.Device, a platform name or a "
                    f"dualprec.DeviceCaps, got {type(device).__name__}")


class Precision(contract.Precision):
    """A Policy carried out in JAX: jmp-style pytree casts, Flax linen/nnx op policy,
    loss-scaled optax optimizers, device checks.

    ``device``: a jax.Device, a platform name ("cpu", "gpu", "tpu") or a `dualprec.DeviceCaps`
    to check against (default: JAX's first device); ``caps=`` is the older spelling of the
    same.  A policy the device cannot run raises PolicyError naming the fallback.
    ``enable_x64``: a float64 policy turns jax_enable_x64 on (with a warning) when True,
    raises PolicyError when False.
    """

    def __init__(self, policy: Any = "32-true", device=None, *, enable_x64: bool = True,
                 caps: DeviceCaps | None = None):
        self._policy = Policy.parse(policy)
        _check_supported(self._policy)
        self._caps = _caps_of(caps if caps is not None else device)
        self.check(self._caps).raise_if_unrunnable()
        _ensure_x64(self.policy, enable_x64)
        from .autocast import TraceCache

        self._trace_cache = TraceCache()  # eager apply: the traces of the last models/shapes

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def caps(self) -> DeviceCaps:
        return self._caps

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
        import jax.numpy as jnp

        # jnp's scalar types (jnp.float32), which jmp's own tables (str(), dtype_to_names) are keyed by
        p = self.policy
        return jmp.Policy(param_dtype=getattr(jnp, p.param_dtype), compute_dtype=getattr(jnp, p.compute_dtype),
                          output_dtype=getattr(jnp, p.output_dtype))

    # ----- Flax -----------------------------------------------------------------------
    def autocast(self, fun=None):
        """``autocast(fun)``: ``fun`` under the whole op table, hand-written ops included
        (`dualprec_jax.autocast`, what `apply`, `init`, nnx calls after `setup` and
        `TrainState.apply_fn` run).  ``autocast()``: the context manager of the stock linen
        layers alone (parameter dtypes, fused bias, FP8/quantized layers), which that trace
        runs inside; jnp / jax.nn ops called under it keep plain JAX's dtypes."""
        if fun is not None:
            from .autocast import autocast

            return autocast(fun, self.policy, context=self.autocast)
        inner = fp8.autocast(self.policy, flax_linen.autocast(self.policy), self.caps)  # FP8 Dense, op policy
        return quant.autocast(self.policy, inner) if self.policy.uses_quantization else inner

    @contextlib.contextmanager
    def init_module(self):
        """Context manager for creating linen parameters (model.init) in the param dtype."""
        with self.autocast():
            yield

    def _traced(self, fun):
        """``fun`` under the whole op table (`dualprec_jax.autocast`), traced inside this
        Precision's layer context (param dtypes, fused bias, overrides, FP8/quantized layers)."""
        from .autocast import autocast

        return autocast(fun, self.policy, context=self.autocast)

    def init(self, model, rngs, *args, **kwargs):
        """``model.init`` under the policy: parameters created in the param dtype of their
        path; the forward pass init runs is traced under the op table, as `apply` is."""
        seen = set()

        def note_path(next_fun, args_, kwargs_, context):
            seen.add(flax_linen.module_path(context.module))
            return next_fun(*args_, **kwargs_)

        import flax.linen as nn

        with nn.intercept_methods(note_path):
            variables = self._traced(model.init)(rngs, *args, **kwargs)
        self.policy.check_overrides_match(seen, "dualprec_jax init")
        variables = self._params_to_policy(variables)
        return quant.quantize_params(variables, self.policy) if self.policy.uses_quantization else variables

    def apply(self, model, variables, *args, **kwargs):
        """``model.apply`` under the whole op table (`dualprec_jax.autocast`: stock layers and
        every jnp / jax.nn op the model runs, as torch autocast on CUDA), outputs in the output
        dtype.  Inputs are passed as given (autocast semantics); call ``convert_input`` for
        jmp-style input casts.  Arguments that are not arrays (flags, ``mutable=``,
        ``method=``) are passed through as they are.

        An nnx model (after `setup`) has no variables to pass: ``prec.apply(model, x)`` calls
        ``model(x)`` under the table, writes the state the call changed (BatchNorm
        statistics, RNG counts) back into ``model`` and casts the outputs to the output
        dtype."""
        from flax import nnx

        from .autocast import pin_dtype

        # pin_dtype: inside an enclosing autocast (prec.autocast(lambda v, x: prec.apply(...)))
        # the output cast holds even where it was a no-op at trace time
        if isinstance(model, nnx.Module):
            return pin_dtype(self.convert_output(flax_nnx.call(model, (variables, *args), kwargs, self._traced)))
        from .autocast import autocast

        if self.policy.uses_fp8 and fp8.engine(self.policy, self._caps) == "transformer-engine":
            from . import te

            te.check_apply_rngs(self.policy, kwargs)
        # eager calls reuse the trace of the same model and argument shapes (inside jax.jit the
        # arguments are tracers: traced each time jit traces, as before)
        out = autocast(model.apply, self.policy, context=self.autocast,
                       cache=(self._trace_cache, ("apply", model)))(
            fp8.max_accumulating(variables), *args, **kwargs)
        if kwargs.get("mutable"):
            y, state = out
            return pin_dtype(self.convert_output(y)), state
        return pin_dtype(self.convert_output(out))

    def setup(self, model):
        """An nnx model put under the policy, in place (params cast, layers configured)."""
        from flax import nnx

        if not isinstance(model, nnx.Module):
            raise TypeError(f"setup() takes a flax.nnx Module, got {type(model).__name__}; for linen "
                            "use prec.init(model, rng, x) and prec.apply(model, variables, x)")
        self.policy.check_overrides_match(
            (".".join(map(str, path)) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)),
            "dualprec_jax setup")
        if self.policy.uses_quantization:
            model = quant.quantize_module(model, self.policy)
        return flax_nnx.setup(fp8.setup_nnx(model, self.policy), self.policy)

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
        """``tx`` with this policy's loss scaling, non-finite rule and master weights: see
        `loss_scaled`."""
        wrapped = loss_scaled(tx, self.policy)

        def init(params):
            # the parameter names `last_step` reports a non-finite gradient under
            self._param_paths = floating_paths(params)
            return wrapped.init(params)

        import optax

        from .optim import _WRAPPED

        setattr(init, _WRAPPED, True)  # a second wrap_optimizer / TrainState.create(tx=...) refuses it
        return optax.GradientTransformationExtraArgs(init, wrapped.update)

    def step(self, tx, grads, opt_state, params):
        """``tx.update`` (the wrapped optimizer) then ``optax.apply_updates``: returns
        ``(params, opt_state)``.  ``grads`` are those of the scaled loss.  Under
        ``nonfinite=raise`` a skipped step raises NonFiniteGradientError naming the first
        parameter whose gradient is not finite (outside jit; inside jit read `last_step`)."""
        import optax

        if not isinstance(opt_state, LossScaledOptState):
            raise TypeError(f"step(tx, grads, opt_state, params): opt_state must be the wrapped optimizer's "
                            f"state (tx.init(params) of prec.wrap_optimizer(...)), got {type(opt_state).__name__}")
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if self.policy.nonfinite_rule == "raise" and not isinstance(opt_state.skipped, jax.core.Tracer):
            report = self.last_step(opt_state, grads)
            if report.outcome == "skipped":
                raise NonFiniteGradientError(f"nonfinite=raise: the gradient of {report.nonfinite_parameter} is "
                                             "not finite (inf/NaN); the step was skipped (the state after it, "
                                             "loss scale backed off, is err.params, err.opt_state)",
                                             parameter=report.nonfinite_parameter, params=params,
                                             opt_state=opt_state)
        return params, opt_state

    def last_step(self, opt_state, params=None) -> contract.StepReport:
        """`dualprec_jax.last_step` (the one reader of what the last update did), naming the
        first non-finite parameter from ``params`` or, by default, from the tree the wrapped
        optimizer was initialised on.

        Args:
            opt_state: The wrapped optimizer's state (or a TrainState / nnx.Optimizer holding it).
            params: Any tree of the parameters' structure (optional).

        Returns:
            The `dualprec.contract.StepReport` ("none" before any update and after
            `load_state_dict`).
        """
        paths = floating_paths(params) if params is not None else getattr(self, "_param_paths", None)
        return _report(opt_state_of(opt_state), paths)

    # ----- checkpoints ----------------------------------------------------------------
    def state_dict(self, opt_state, variables=None) -> dict:
        """The precision state of ``opt_state`` (and of ``variables``, for registered
        extensions such as FP8 scales), in the form both backends read: see
        `dualprec.checkpoint`."""
        import numpy as np

        if not isinstance(opt_state, LossScaledOptState):
            raise TypeError(f"state_dict(opt_state): expected the wrapped optimizer's state, got "
                            f"{type(opt_state).__name__}")
        masters = {}
        if opt_state.master is not None:
            leaves = [x for x in jax.tree_util.tree_leaves(opt_state.master) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
            masters = {n: np.asarray(x) for n, x in zip(floating_paths(opt_state.master), leaves)}
        extensions = {}
        if variables is not None:
            for name, ext in checkpoint.state_extensions("jax").items():
                tensors = ext.state_tensors(variables)
                if tensors:
                    extensions[name] = tensors
        ls = opt_state.loss_scale
        return checkpoint.new_state(self.policy, float(ls.scale), int(ls.counter), masters, extensions)

    def load_state_dict(self, state: dict, opt_state, variables=None, *, strict: bool = True):
        """Restore a precision state (`state_dict`, from either backend).

        Args:
            state: The precision state dict.
            opt_state: The wrapped optimizer's state to load it into.
            variables: The model variables, when the checkpoint carries state of registered
                extensions (FP8 scales); None otherwise.
            strict: Refuse another policy's state; ``strict=False`` takes only what both
                policies share (a 16-mixed scale does not go into a bf16-mixed run).

        Returns:
            ``(opt_state, variables)`` always: the state with the loss scale (and master
            weights) of ``state``, and ``variables`` with the extensions' state restored
            (None when None was passed).
        """
        import jax.numpy as jnp

        if not isinstance(opt_state, LossScaledOptState):
            raise TypeError(f"load_state_dict(state, opt_state): opt_state must be the wrapped optimizer's state "
                            f"(tx.init(params)), got {type(opt_state).__name__}")
        saved = checkpoint.check_state(state, self.policy, strict)
        if self.policy.loss_scale.enabled and saved.loss_scale.enabled:
            ls = checkpoint.clamped_loss_scale(state["loss_scale"], self.policy)
            opt_state = opt_state._replace(loss_scale=LossScaleState(jnp.asarray(ls["scale"], jnp.float32),
                                                                     jnp.asarray(ls["counter"], jnp.int32)))
        if opt_state.master is not None and saved.master_weights:
            opt_state = opt_state._replace(master=self._load_masters(opt_state.master, state["master_weights"], strict))
        opt_state = opt_state._replace(skipped=jnp.asarray(False), nonfinite_leaf=jnp.asarray(NO_STEP, jnp.int32))
        for ext, tensors in checkpoint.loadable_extensions("jax", state.get("extensions", {}), strict):
            if variables is None:
                raise CheckpointError(f"the checkpoint carries {ext.name!r} state: pass the model variables, "
                                      "load_state_dict(state, opt_state, variables)")
            variables = ext.load_state_tensors(variables, tensors)
        return opt_state, variables

    @staticmethod
    def _load_masters(master, saved: dict, strict: bool):
        import jax.numpy as jnp

        paths = floating_paths(master)
        missing, unexpected = sorted(set(paths) - set(saved)), sorted(set(saved) - set(paths))
        if strict and (missing or unexpected):
            raise CheckpointError(f"master weights: missing in the checkpoint: {missing or 'none'}; not in this "
                                  f"optimizer state: {unexpected or 'none'}")
        leaves, treedef = jax.tree_util.tree_flatten(master)
        names = iter(paths)
        out = []
        for x in leaves:
            if jnp.issubdtype(x.dtype, jnp.floating):
                name = next(names)
                if name in saved:
                    if tuple(saved[name].shape) != tuple(x.shape):
                        raise CheckpointError(f"master weight {name}: shape {tuple(saved[name].shape)} in the "
                                              f"checkpoint, {tuple(x.shape)} here")
                    x = jnp.asarray(saved[name], jnp.float32)
            out.append(x)
        return jax.tree_util.tree_unflatten(treedef, out)

    def scale_loss(self, loss, loss_scale: LossScaleState):
        """`dualprec_jax.scale_loss`: the loss times the current scale (differentiate this).

        Args:
            loss: The loss.
            loss_scale: The `LossScaleState`, ``opt_state.loss_scale``.

        Returns:
            ``loss * scale`` in float32 at least.
        """
        if isinstance(loss_scale, LossScaledOptState):
            warnings.warn("prec.scale_loss(loss, opt_state) is deprecated: pass the loss-scale state, "
                          "prec.scale_loss(loss, opt_state.loss_scale) (the forward pass needs only the scale)",
                          DeprecationWarning, stacklevel=2)
            loss_scale = loss_scale.loss_scale
        return scale_loss(loss, loss_scale)

    # ----- devices --------------------------------------------------------------------
    def check(self, device=None) -> CheckReport:
        """What this policy needs against ``device`` (a jax.Device, a platform name or a
        `dualprec.DeviceCaps`; default: the Precision's own device)."""
        return self.policy.check(self.caps if device is None else _caps_of(device))

    device_caps = staticmethod(device_caps)
