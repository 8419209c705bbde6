"""The JAX side of the suite: drives ``dualprec_jax.Precision`` through the Backend interface
(pytree casts, the Flax linen model run under the policy, the loss-scaled optax wrapper)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dualprec import Policy

from ..numerics import dtype_name
from ..weights import WeightMap, flatten_flax
from ..zoo import ModelSpec
from .base import Backend, Optim, Session, StepInfo



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


    def convert_input(self, policy, x):
        import jax.numpy as jnp

        return to_numpy(self.precision(policy).convert_input(jnp.asarray(x)))

    def convert_output(self, policy, x):
        import jax.numpy as jnp

        return to_numpy(self.precision(policy).convert_output(jnp.asarray(x)))

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
        self.grad_fn = jax.jit(jax.value_and_grad(self._scaled_loss, has_aux=True))
        self.fwd = jax.jit(self._forward)
        self._optimizers = {}
        self._param_structs = None

    def param_structs(self):
        """The parameter tree ``Precision.init`` builds (shapes and per-module dtypes), traced
        abstractly once: init decides the dtypes, the canonical weights supply the values."""
        import jax

        if self._param_structs is None:
            x0 = self.spec.to_jax_layout(np.zeros(self.spec.input_shape, np.float32))
            self._param_structs = jax.eval_shape(
                lambda: self.prec.init(self.module, jax.random.PRNGKey(0), x0))["params"]
        return self._param_structs

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

    def _logits(self, params, x, capture=False):
        x = self.prec.convert_input(x)
        if capture:
            out, state = self.prec.apply(self.module, {"params": params}, x, capture_intermediates=True,
                                         mutable=["intermediates"])
            return out, state["intermediates"]
        return self.prec.apply(self.module, {"params": params}, x)

    def _forward(self, params, x):
        return self._logits(params, x, capture=True)

    def _scaled_loss(self, params, x, y, loss_scale, mult):
        import jax.numpy as jnp
        import optax

        logits = self._logits(params, x)
        # The loss runs in float32 at least (DESIGN.md): half outputs are upcast, float64 kept.
        wide = logits if logits.dtype in (jnp.float32, jnp.float64) else logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(wide, y).mean()
        return self.prec.scale_loss(loss * mult, loss_scale), loss


class JaxSession(Session):
    """A linen model through ``Precision.init`` / ``apply`` / ``wrap_optimizer`` / ``scale_loss``."""

    def __init__(self, compiled: _Compiled, optimizer, weights: Mapping[str, np.ndarray], weight_map: WeightMap):
        import jax

        self.c, self.prec, self.spec, self.wm = compiled, compiled.prec, compiled.spec, weight_map
        self.tx, self.update = optimizer
        # init decides each parameter's dtype (per-module overrides included); the values
        # are the canonical float32 weights rounded to that dtype.
        self._params = jax.tree_util.tree_map(lambda w, ref: jax.numpy.asarray(w).astype(ref.dtype),
                                              jax.tree_util.tree_map(np.asarray, weight_map.to_flax(weights)),
                                              compiled.param_structs())
        self.opt_state = self.tx.init(self._params)
        self.scaling = self.prec.policy.loss_scale.enabled

    # -- Session interface ----------------------------------------------------------------
    def param_dtypes(self):
        return {n: dtype_name(a) for n, a in self.wm.to_torch(self._params).items()}

    def params(self):
        import jax

        return self.wm.to_torch(jax.tree_util.tree_map(to_numpy, self._params))

    def forward(self, x):
        out, inter = self.c.fwd(self._params, self.spec.to_jax_layout(x))
        named = {}
        for path, leaf in flatten_flax(inter).items():
            if path[-1] == "__call__" and len(path) > 1:
                named[".".join(path[:-1])] = self.spec.from_jax_layout(to_numpy(leaf[-1]))  # outermost call
        return to_numpy(out), named

    def _grads(self, x, y, mult):
        (scaled, loss), grads = self.c.grad_fn(self._params, self.spec.to_jax_layout(x), y,
                                              self.opt_state.loss_scale, mult)
        return loss, grads

    def loss_and_grads(self, x, y):
        import jax
        import dualprec_jax

        loss, grads = self._grads(x, y, 1.0)
        if self.scaling:
            grads = dualprec_jax.unscale(grads, self.opt_state.loss_scale)
        return float(loss), self.wm.to_torch(jax.tree_util.tree_map(to_numpy, grads))

    def train_step(self, x, y, loss_multiplier=1.0):
        import dualprec_jax

        loss, grads = self._grads(x, y, loss_multiplier)
        skipped = self.scaling and not bool(dualprec_jax.all_finite(grads))
        self._params, self.opt_state = self.update(grads, self.opt_state, self._params)
        ls = self.opt_state.loss_scale
        return StepInfo(float(loss), float(ls.scale), int(ls.counter), skipped=skipped,
                        opt_steps=_count(self.opt_state.inner))
