"""The JAX side of the suite: drives ``dualprec_jax.Precision`` through the Backend interface
(pytree casts, the Flax linen model run under the policy, the loss-scaled optax wrapper)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..numerics import dtype_name
from ..weights import WeightMap, flatten_flax
from ..zoo import ModelSpec
from .base import Backend, Optim, Session, StepInfo

#: Flax's collection whose "gradient" is the variable's next value (FP8 scales, histories).
OWG = "_overwrite_with_gradient"
#: The key under which the frozen quantized arrays travel in the state argument of the jitted
#: functions (they are merged into the params there; never differentiated, never mutable).
FROZEN = "_quant_frozen"


def to_numpy(a) -> np.ndarray:
    return np.array(a)  # jax arrays (bfloat16 included) convert exactly via ml_dtypes


def _tx(optim: Optim):
    import optax

    return optax.adam(optim.lr) if optim.kind == "adam" else optax.sgd(optim.lr)


def _count(opt_state) -> int | None:
    """Adam's step count from an optax state pytree (the first ``count`` field found)."""
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if any(getattr(k, "name", None) == "count" for k in path):
            return int(leaf)
    return None


class JaxBackend(Backend):
    """``precision_cls`` defaults to dualprec_jax.Precision; tests pass a stand-in."""

    name = "jax"
    package = "dualprec_jax"

    def __init__(self, precision_cls=None):
        super().__init__(precision_cls)
        # (spec, policy) -> _Compiled: jit once per model and policy, reused by every session
        # of that pair whatever its optimizer (the optimizer update is jitted per Optim).
        self._compiled = {}


    def float32_matmul_mode(self):
        """JAX's ``jax_default_matmul_precision``; unset, XLA uses IEEE float32 on CPU,
        TF32 on NVIDIA GPUs (Ampere and later) and bfloat16 passes on TPUs."""
        import jax

        setting = jax.config.jax_default_matmul_precision
        named = {"highest": "ieee", "float32": "ieee", "tensorfloat32": "tf32", "high": "tf32",
                 "bfloat16": "bf16", "default": None, "fastest": None, None: None}
        mode = named.get(str(setting).lower() if setting is not None else None)
        if mode is None:
            mode = {"cpu": "ieee", "gpu": "tf32", "cuda": "tf32", "rocm": "tf32", "tpu": "bf16"}.get(
                jax.default_backend(), "ieee")
        return mode

    def convert_input(self, policy, x):
        import jax.numpy as jnp

        return to_numpy(self.precision(policy).convert_input(jnp.asarray(x)))

    def convert_output(self, policy, x):
        import jax.numpy as jnp

        return to_numpy(self.precision(policy).convert_output(jnp.asarray(x)))

    def block_parts(self, x, w, g, recipe, seed, step):
        import jax.numpy as jnp

        from dualprec_jax import blockscale

        parts = blockscale.block_linear_parts_jit(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), recipe,
                                                  jnp.int32(seed), jnp.int32(step))
        return {k: np.asarray(v) for k, v in parts.items()}

    def session(self, spec, policy, weights, weight_map, optim):
        key = (spec, policy)
        if key not in self._compiled:
            self._compiled[key] = _Compiled(self.precision(policy), spec)
        return JaxSession(self._compiled[key], self._compiled[key].optimizer(optim), weights, weight_map)


class _Compiled:
    """The jitted pure functions of one (model, policy); sessions share them.  The loss and
    its gradient take only the loss-scale state, so SGD and Adam sessions share one compiled
    gradient; each optimizer gets its own jitted update (``optimizer``)."""

    def __init__(self, prec, spec: ModelSpec):
        import jax

        self.prec, self.spec = prec, spec
        self.module = spec.flax_module()
        self.grad_fn = jax.jit(jax.value_and_grad(self._scaled_loss, argnums=(0, 1), has_aux=True))
        self.fwd = jax.jit(self._forward)
        self.isolated = jax.jit(self._isolated)
        self.glue = jax.jit(self._glue)
        self._optimizers = {}
        self._param_structs = None
        self._state0 = None
        self.quantizes = prec.policy.uses_quantization
        self.quantized = None  # (canonical weights, their quantize_params result)

    def _x0(self):
        return self.spec.to_jax_layout(np.zeros(self.spec.input_shape, self.spec.input_dtype))

    def param_structs(self):
        """The float parameter tree ``Precision.init`` builds (shapes and per-module dtypes),
        traced abstractly once: init decides the dtypes, the canonical weights supply the
        values.  Under a quantizing policy: the tree before ``quant.quantize_params`` (init
        quantizes its own random weights; the session quantizes the canonical ones)."""
        import jax

        if self._param_structs is None:
            init = self._float_init if self.quantizes else self.prec.init
            structs = jax.eval_shape(lambda: init(self.module, jax.random.PRNGKey(0), self._x0()))
            self._param_structs = structs["params"]
            self._has_state = any(k != "params" for k in structs)
        return self._param_structs

    def _float_init(self, model, rng, x):
        """``Precision.init`` up to its last step (quantize_params): the model initialised
        under the policy, each parameter in the param dtype of its module's path."""
        import jax

        from dualprec_jax.casts import cast_floating, jax_dtype

        with self.prec.autocast():
            variables = model.init(rng, x)
        policy = self.prec.policy

        def cast(path, a):
            owner = ".".join(str(getattr(k, "key", k)) for k in path[:-1])
            return cast_floating(a, jax_dtype(policy.for_module(owner).param_dtype))

        return {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}

    def initial_state(self) -> dict:
        """The variable collections besides params (FP8 scales and amax histories...), as
        ``Precision.init`` creates them; {} for the usual model."""
        import jax

        self.param_structs()
        if self._state0 is None:
            self._state0 = {}
            if self._has_state:
                init = self._float_init if self.quantizes else self.prec.init
                v = init(self.module, jax.random.PRNGKey(0), self._x0())
                self._state0 = {k: c for k, c in v.items() if k != "params"}
        return self._state0

    def optimizer(self, optim: Optim):
        """(wrapped optax transform, jitted update) for ``optim``, built once."""
        import jax

        if optim not in self._optimizers:
            tx = self.prec.wrap_optimizer(_tx(optim))

            def update(grads, opt_state, params):
                import optax

                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            self._optimizers[optim] = (tx, jax.jit(update))
        return self._optimizers[optim]

    def _logits(self, params, state, x, capture=False):
        """(output, intermediates or None, updated state collections)."""
        x = self.prec.convert_input(x)
        state = dict(state)
        frozen = state.pop(FROZEN, None)
        if frozen is not None:  # quantized layers: the frozen codes merged into the params
            from dualprec_jax import quant

            params = quant.merge_params(params, frozen)
        mutable = list(state) + (["intermediates"] if capture else [])
        variables = {"params": params, **state}
        if not mutable:
            return self.prec.apply(self.module, variables, x), None, {}
        out, new = self.prec.apply(self.module, variables, x, capture_intermediates=capture, mutable=mutable)
        new = dict(new)
        inter = new.pop("intermediates", None)
        return out, inter, new

    def _forward(self, params, state, x):
        out, inter, _ = self._logits(params, state, x, capture=True)
        return out, inter

    def _isolated(self, params, state, x, subs):
        """Two passes: one with the input of every layer without submodules swapped in, one
        with the inputs of the layers that have submodules (their own functional ops, the
        softmax of an attention block say, then run on the shared input too)."""
        import flax.linen as nn

        got = {}
        names = list(subs)
        leaves = {n for n in names if not any(m.startswith(n + ".") for m in names)}

        def swapper(selected, swapped):
            def swap(next_fun, args, kwargs, context):
                name = ".".join(map(str, context.module.path))
                if context.method_name != "__call__" or name not in selected:
                    return next_fun(*args, **kwargs)
                if not args or getattr(args[0], "shape", None) != subs[name].shape:
                    return next_fun(*args, **kwargs)  # another signature: not isolated
                swapped.add(name)
                return next_fun(subs[name], *args[1:], **kwargs)
            return swap

        for selected in (leaves, set(names) - leaves):
            if selected:
                def keep(module, method_name, selected=selected):
                    return method_name == "__call__" and ".".join(map(str, module.path)) in selected

                # The outputs come back through Flax's intermediates (Precision.apply traces
                # the model under the op table: a value kept aside from inside would be a
                # tracer of that trace).
                swapped = set()
                with nn.intercept_methods(swapper(selected, swapped)):  # outermost: the policy sees the swapped input
                    _, inter, _ = self._logits(params, state, x, capture=keep)
                for path, leaf in flatten_flax(inter).items():
                    name = ".".join(path[:-1])
                    if path[-1] == "__call__" and name in swapped:
                        got[name] = leaf[-1]
        return got

    def _glue(self, params, state, x, subs_in, subs_out):
        """The blocks of ``subs_in`` on their given inputs, their direct children (``subs_out``)
        returning the given outputs (cast to the dtype the child computed): only each
        block's own ops run on this side's arithmetic."""
        import flax.linen as nn

        blocks, swapped, replaced = set(subs_in), set(), set()

        def swap(next_fun, args, kwargs, context):
            name = ".".join(map(str, context.module.path))
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if name in blocks and args and getattr(args[0], "shape", None) == subs_in[name].shape:
                swapped.add(name)
                return next_fun(subs_in[name], *args[1:], **kwargs)
            out = next_fun(*args, **kwargs)
            if name in subs_out and getattr(out, "shape", None) == subs_out[name].shape:
                replaced.add(name)
                return subs_out[name].astype(out.dtype)
            return out

        def keep(module, method_name):
            return method_name == "__call__" and ".".join(map(str, module.path)) in blocks

        with nn.intercept_methods(swap):
            _, inter, _ = self._logits(params, state, x, capture=keep)
        got = {}
        for path, leaf in flatten_flax(inter).items():
            name = ".".join(path[:-1])
            children = {c for c in subs_out if c.startswith(name + ".")}
            if path[-1] == "__call__" and name in swapped and children and children <= replaced:
                got[name] = leaf[-1]
        return got

    def _class_axis(self, ndim: int) -> int:
        """The class axis of the output in the JAX layout (``spec.class_axis`` is torch's)."""
        if ndim <= 2:
            return -1
        axis = self.spec.class_axis % ndim
        return (0, 2, 3, 1).index(axis) if self.spec.channels_last_in_jax and ndim == 4 else axis

    def _scaled_loss(self, params, owg, state, x, y, loss_scale, mult):
        """``owg``: Flax's ``_overwrite_with_gradient`` collection (FP8 scales and histories),
        differentiated like params; its "gradient" is its next value."""
        import jax.numpy as jnp
        import optax

        full = dict(state, **({OWG: owg} if owg else {}))
        logits, _, new_state = self._logits(params, full, x)
        # The loss runs in float32 at least: half outputs are upcast, float64 kept.
        wide = logits if logits.dtype in (jnp.float32, jnp.float64) else logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(wide, y, axis=self._class_axis(wide.ndim)).mean()
        new_state.pop(OWG, None)
        return self.prec.scale_loss(loss * mult, loss_scale), (loss, new_state)


class JaxSession(Session):
    """A linen model through ``Precision.init`` / ``apply`` / ``wrap_optimizer`` / ``scale_loss``."""

    def __init__(self, compiled: _Compiled, optimizer, weights: Mapping[str, np.ndarray], weight_map: WeightMap):
        import jax

        # checked against the model's own parameter paths (Sequential spellings resolved)
        weight_map = weight_map.resolve(compiled.param_structs())
        self.c, self.prec, self.spec, self.wm = compiled, compiled.prec, compiled.spec, weight_map
        self._torch_names = weight_map.module_names()  # Flax module path -> torch name
        self.tx, self.update = optimizer
        # init decides each parameter's dtype (per-module overrides included); the values
        # are the canonical float32 weights rounded to that dtype.
        self._params = jax.tree_util.tree_map(lambda w, ref: jax.numpy.asarray(w).astype(ref.dtype),
                                              jax.tree_util.tree_map(np.asarray, weight_map.to_flax(weights)),
                                              compiled.param_structs())
        state = dict(compiled.initial_state())
        self._owg = state.pop(OWG, {})
        self._frozen, self._frozen_names, self._frozen_layers, self._quant0 = None, set(), {}, {}
        if compiled.quantizes:
            self._quantize(weight_map, weights)
            state[FROZEN] = self._frozen
        self._state = state
        self.opt_state = self.tx.init(self._params)
        self.scaling = self.prec.policy.loss_scale.enabled
        self._x = None

    def _quantize(self, weight_map, weights):
        """The canonical float weights (rounded to the param dtype as above) quantized by
        ``quant.quantize_params``, the path ``Precision.init`` takes, and split: the
        trainable tree (biases, int8-training kernels, unquantized layers) is what the
        optimizer and the gradient see; the frozen codes travel beside it."""
        from dualprec_jax import quant

        cached = self.c.quantized
        if cached is not None and cached[0] is weights:  # the sessions of one cell share the weights
            full = cached[1]
        else:
            full = quant.quantize_params(self._params, self.prec.policy)
            self.c.quantized = (weights, full)  # holds the weights: their id cannot be reused
        self._params, self._frozen = quant.split_params(full)
        for name, rule in weight_map.rules.items():
            path = rule.flax_path
            if path[-1] != "kernel":
                continue
            node = full
            for k in path[:-1]:
                node = node[k]
            if quant.QWEIGHT in node:
                n_in, n_out = _leaf(self.c.param_structs(), path).shape
                self._frozen_names.add(name)
                self._frozen_layers[name] = (path[:-1], (int(n_out), int(n_in)))
        # params(), gradients and optimizer names: the float parameters only
        self.wm = WeightMap({n: r for n, r in weight_map.rules.items() if n not in self._frozen_names})
        self._quant0 = self.quant_state()

    # -- Session interface ----------------------------------------------------------------
    def param_dtypes(self):
        return {n: dtype_name(a) for n, a in self.wm.to_torch(self._params).items()}

    def params(self):
        import jax

        return self.wm.to_torch(jax.tree_util.tree_map(to_numpy, self._params))

    def _state_all(self):
        return dict(self._state, **({OWG: self._owg} if self._owg else {}))

    def forward(self, x):
        out, inter = self.c.fwd(self._params, self._state_all(), self.spec.to_jax_layout(x))
        named = {}
        for path, leaf in flatten_flax(inter).items():
            if path[-1] == "__call__" and len(path) > 1:
                flax_name = ".".join(path[:-1])
                named[self._torch_names.get(flax_name, flax_name)] = self.spec.from_jax_layout(to_numpy(leaf[-1]))
        return to_numpy(out), named

    def run_layers(self, x, inputs):
        """One jitted pass with *every* given submodule's input swapped in: each submodule's
        output then depends on its own (shared) input only."""
        import jax.numpy as jnp

        flax_of = {t: f for f, t in self._torch_names.items()}
        subs = {flax_of.get(n, n): jnp.asarray(self.spec.to_jax_layout(a)) for n, a in inputs.items()}
        got = self.c.isolated(self._params, self._state_all(), self.spec.to_jax_layout(x), subs)
        return {self._torch_names.get(n, n): self.spec.from_jax_layout(to_numpy(o)) for n, o in got.items()}

    def run_glue(self, x, inputs, outputs):
        import jax.numpy as jnp

        flax_of = {t: f for f, t in self._torch_names.items()}
        conv = lambda d: {flax_of.get(n, n): jnp.asarray(self.spec.to_jax_layout(a)) for n, a in d.items()}
        got = self.c.glue(self._params, self._state_all(), self.spec.to_jax_layout(x), conv(inputs), conv(outputs))
        return {self._torch_names.get(n, n): self.spec.from_jax_layout(to_numpy(o)) for n, o in got.items()}

    def grad_dtypes(self):
        return dict(getattr(self, "_grad_dtypes", {}))

    # -- quantized layers and FP8 state ---------------------------------------------------
    def quant_frozen(self):
        return set(self._frozen_names)

    def frozen_with_grad(self):
        return list(getattr(self, "_frozen_with_grad", []))

    def _full_params(self):
        from dualprec_jax import quant

        return self._params if self._frozen is None else quant.merge_params(self._params, self._frozen)

    def quant_state(self):
        from dualprec_jax import quant

        policy = self.prec.policy
        full = self._full_params()
        out = {}
        if self._frozen_names:
            for k, v in quant.state_tensors(full, policy).items():
                out[k] = np.asarray(v).copy()
        for name, rule in self.wm.rules.items():
            path = rule.flax_path
            spec = quant.QuantSpec.of(policy, ".".join(path[:-1])) if path[-1] == "kernel" else None
            if spec is None or spec.frozen or np.ndim(_leaf(full, path)) != 2:
                continue  # (a convolution's kernel is never quantized: Dense-like layers only)
            q = quant.quantize_int8(_leaf(full, path).T)  # the codes its forward makes
            module = name.rsplit(".", 1)[0]
            out[f"{module}.weight.int8"], out[f"{module}.SCB"] = to_numpy(q["weight"]), to_numpy(q["SCB"])
        return {self._torch_key(k): v for k, v in out.items()}

    def _torch_key(self, key: str) -> str:
        """A bitsandbytes key of a Flax module path ("blocks_0.fc.weight.absmax") under the
        torch module name ("blocks.0.fc.weight.absmax")."""
        for flax_name in sorted(self._torch_names, key=len, reverse=True):
            if key.startswith(flax_name + "."):
                return self._torch_names[flax_name] + key[len(flax_name):]
        return key

    def dequantized(self):
        import jax.numpy as jnp

        from dualprec_jax import quant
        from dualprec_jax.casts import jax_dtype

        out = {}
        for name, (module_path, shape) in self._frozen_layers.items():
            spec = quant.QuantSpec.of(self.prec.policy, ".".join(module_path))
            q = _leaf(self._frozen, module_path + (quant.QWEIGHT,))
            if spec.is_4bit:
                pdt = jax_dtype(spec.param_dtype)
                w = quant.dequantize_4bit(q, spec.quant_type, spec.blocksize, shape, pdt, pdt)
            else:
                w = quant.dequantize_int8(q, jnp.float32)
            out[name] = to_numpy(w)
        return out

    def fp8_state(self):
        from dualprec_jax import fp8

        state = {k: v for k, v in self._state_all().items() if k != FROZEN}
        return {k: np.asarray(v) for k, v in fp8.state_tensors({"params": self._params, **state},
                                                                 self.prec.policy).items()}

    def optimizer_state_dtypes(self):
        import jax

        inner = getattr(self.opt_state, "inner", self.opt_state)
        out = {}
        names = {"mu": "exp_avg", "nu": "exp_avg_sq"}
        for path, leaf in jax.tree_util.tree_flatten_with_path(inner)[0]:
            keys = [getattr(k, "name", None) or getattr(k, "key", None) for k in path]
            field = next((names[k] for k in keys if k in names), None)
            if field is None or not getattr(leaf, "ndim", 0):
                continue
            flax_path = tuple(str(k) for k in keys if k not in names and isinstance(k, str))
            torch_name = next((t for t in self.wm.rules if self.wm.rules[t].flax_path == flax_path), "/".join(flax_path))
            out[f"{torch_name}.{field}"] = dtype_name(leaf)
        return out

    def _grads(self, x, y, mult):
        import jax

        (scaled, (loss, new_state)), (grads, owg_next) = self.c.grad_fn(
            self._params, self._owg, self._state, self.spec.to_jax_layout(x), y,
            self.opt_state.loss_scale, mult)
        self._grad_dtypes = {n: self.wm.rules[n].flax_path and dtype_name(_leaf(grads, self.wm.rules[n].flax_path))
                             for n in self.wm.rules}
        if self._frozen is not None:  # a gradient leaf under a quantized layer's qweight
            from dualprec_jax import quant

            self._frozen_with_grad = sorted({
                ".".join(str(getattr(k, "key", k)) for k in path[:[getattr(k, "key", k) for k in path].index(quant.QWEIGHT)])
                for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]
                if quant.QWEIGHT in [getattr(k, "key", k) for k in path]})
        return loss, grads, owg_next, new_state

    def loss_and_grads(self, x, y):
        import jax

        import dualprec_jax

        loss, grads, _, _ = self._grads(x, y, 1.0)
        if self.scaling:
            grads = dualprec_jax.unscale(grads, self.opt_state.loss_scale)
        return float(loss), self.wm.to_torch(jax.tree_util.tree_map(to_numpy, grads))

    def train_step(self, x, y, loss_multiplier=1.0):

        loss, grads, owg_next, new_state = self._grads(x, y, loss_multiplier)
        self._params, self.opt_state = self.update(grads, self.opt_state, self._params)
        skipped = _skipped(self.opt_state, grads, self.scaling)
        if self._owg and not skipped:
            self._owg = owg_next
        if new_state and not skipped:
            self._state = dict(self._state, **new_state)
        ls = self.opt_state.loss_scale
        return StepInfo(float(loss), float(ls.scale), int(ls.counter), skipped=skipped,
                        opt_steps=_count(self.opt_state.inner))


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _skipped(opt_state, grads, scaling: bool) -> bool:
    """The backend's own signal that the last update was skipped (the wrapped optimizer's
    state records it); without one, whether the gradients were non-finite under scaling."""
    flag = getattr(opt_state, "skipped", None)
    if flag is not None:
        return bool(flag)
    import dualprec_jax

    return scaling and not bool(dualprec_jax.all_finite(grads))
