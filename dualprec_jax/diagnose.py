"""`diagnose`: which modules of a Flax linen model break under a policy, and the policy that
fixes them (the search and the report type are the spec layer's: `dualprec.diagnose`).

    report = diagnose(model, variables, (x, y), "16-mixed", target=0.05)
    report.render()
    print(report.suggested)

Every run starts from ``variables`` (float32) and trains for ``steps`` SGD steps through
`Precision` (init for the state collections, apply, wrap_optimizer, scale_loss), so loss
scaling, quantized layers (``quant.quantize_params``) and FP8 state behave as in training.
Module paths are the dotted linen paths ``Policy.for_module`` matches; the conformance
zoo's twins use the torch names, so the two backends' reports pair up by path.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from dualprec import Policy
from dualprec.diagnose import DEFAULT_TARGET, DiagnoseReport, Trace, search

__all__ = ["diagnose", "runner"]

OWG = "_overwrite_with_gradient"

#: retries of a step whose scaled gradients overflowed (dynamic loss scaling backs off each time)
MAX_RETRIES = 24

#: the default of ``jit=``: a jitted step compiles once per variant, which on small models on
#: the CPU took longer than running the few steps eagerly (docs/diagnose.md, measured cost)
JIT = False


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def default_loss(out, y):
    """Cross entropy over the last axis of ``out`` with integer labels ``y`` (float32 at least)."""
    import jax.numpy as jnp
    import optax

    wide = out if out.dtype in (jnp.float32, jnp.float64) else out.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(wide, y).mean()


def _batches(batch, steps: int) -> list[tuple]:
    if isinstance(batch, tuple) and len(batch) == 2 and hasattr(batch[0], "shape"):
        batch = [batch]
    batch = list(batch)
    if not batch:
        raise ValueError("diagnose: batch is empty; pass (inputs, targets) or a list of them, one per step")
    return [batch[i % len(batch)] for i in range(steps)]


def module_list(model, variables, x) -> list[tuple[str, str]]:
    """(dotted path, class name) of every submodule ``model`` calls, in call order."""
    import flax.linen as nn
    import jax

    seen: dict[str, str] = {}

    def note(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = ".".join(map(str, context.module.path))
            if path:
                seen.setdefault(path, type(context.module).__name__)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(note):
        jax.eval_shape(lambda v: model.apply(v, x), variables)
    return list(seen.items())


def runner(model, variables, batch, *, loss_fn: Callable | None = None, steps: int = 3, lr: float = 1e-2,
           rng=None, jit: bool | None = None) -> Callable[[Policy, bool], Trace]:
    """``run(policy, capture) -> Trace`` for `dualprec.diagnose.search`: ``steps`` SGD steps
    from ``variables`` under ``policy``."""
    import jax
    import jax.numpy as jnp
    import optax

    from . import quant
    from .casts import cast_floating, jax_dtype
    from .loss_scale import unscale
    from .precision import Precision

    loss_fn = loss_fn or default_loss
    batches = _batches(batch, steps)
    variables = variables if "params" in variables else {"params": variables}
    params0 = variables["params"]
    bad = [_name(p) for p, a in jax.tree_util.tree_flatten_with_path(params0)[0]
           if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != jnp.float32]
    if bad:
        raise ValueError(f"diagnose: the parameters must be float32 (the weights every run starts from); "
                         f"{bad[0]} is not; pass the float32 variables")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    _jit = jax.jit if (JIT if jit is None else jit) else (lambda f: f)

    def run(policy: Policy, capture: bool) -> Trace:
        t0 = time.perf_counter()
        prec = Precision(policy)
        x0 = jnp.asarray(batches[0][0])
        # the state collections (FP8 scales and histories) as init creates them
        structure = jax.eval_shape(lambda: prec.init(model, rng, x0)) if policy.uses_fp8 else {}
        # the model's own collections (batch_stats...), then those init creates (FP8 state)
        state = {k: v for k, v in variables.items() if k != "params"}
        state.update({k: v for k, v in (prec.init(model, rng, x0).items() if structure else ()) if k != "params"})
        owg = state.pop(OWG, {})

        def cast(path, a):
            owner = _name(path[:-1])
            return cast_floating(jnp.asarray(a), jax_dtype(policy.for_module(owner).param_dtype))

        params = jax.tree_util.tree_map_with_path(cast, params0)
        frozen = None
        if policy.uses_quantization and any(policy.quantizes(m) for m in dense_weights(params0)):
            params, frozen = quant.split_params(quant.quantize_params(params, policy))
        tx = prec.wrap_optimizer(optax.sgd(lr))
        opt_state = tx.init(params)
        mutable = list(state) + (["intermediates"] if capture else [])

        def scaled_loss(params, owg, state, x, y, ls):
            full = quant.merge_params(params, frozen) if frozen is not None else params
            v = {"params": full, **state, **({OWG: owg} if owg else {})}
            if mutable:
                out, new = prec.apply(model, v, x, capture_intermediates=capture, mutable=mutable)
                new = dict(new)
            else:
                out, new = prec.apply(model, v, x), {}
            loss = loss_fn(out, y)
            return prec.scale_loss(loss, ls), (loss, new)

        grad_fn = _jit(jax.value_and_grad(scaled_loss, argnums=(0, 1), has_aux=True))

        @_jit
        def update(grads, opt_state, params):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        tr = Trace([], [], [], [], outputs=[] if capture else None)
        dynamic = policy.loss_scale.kind == "dynamic"
        for x, y in batches:
            for retry in range(MAX_RETRIES + 1):
                ls = opt_state.loss_scale
                (_, (loss, new)), (grads, owg_next) = grad_fn(params, owg, state, jnp.asarray(x), jnp.asarray(y), ls)
                inter = new.pop("intermediates", None)
                plain = unscale(grads, ls) if policy.loss_scale.enabled else grads
                params, opt_state = update(grads, opt_state, params)
                skipped = bool(opt_state.skipped) if opt_state.skipped is not None else False
                if not skipped or not dynamic or not np.isfinite(float(loss)) or retry == MAX_RETRIES:
                    break
            tr.retries.append(retry)
            tr.grads.append({_name(p): np.asarray(a, np.float64 if a.dtype == jnp.float64 else np.float32)
                             for p, a in jax.tree_util.tree_flatten_with_path(plain)[0]})
            if owg and not skipped:
                owg = owg_next
            if new and not skipped:
                state = dict(state, **new)
            tr.losses.append(float(loss))
            tr.scales.append(float(ls.scale) if policy.loss_scale.enabled else 1.0)
            tr.skipped.append(skipped)
            if capture:
                outs = {}
                for p, a in jax.tree_util.tree_flatten_with_path(inter or {})[0]:
                    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in p]
                    if "__call__" in keys:
                        i = keys.index("__call__")
                        if i > 0 and (len(keys) == i + 1 or keys[i + 1] == "0"):
                            outs.setdefault(".".join(keys[:i]), np.asarray(a, np.float64 if a.dtype == jnp.float64
                                                                          else np.float32))
                tr.outputs.append(outs)
        tr.seconds = time.perf_counter() - t0
        return tr

    return run


def dense_weights(params) -> dict[str, tuple[str, np.ndarray]]:
    """Module path -> (parameter name, float32 weight [out, in]) of each 2-D ``kernel``."""
    import jax

    out = {}
    for p, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _name(p)
        if name.endswith(".kernel") and np.ndim(a) == 2:
            out[name.rpartition(".")[0]] = (name, np.asarray(a, np.float32).T.copy())
    return out


def diagnose(model, variables, batch, policy, *, loss_fn: Callable | None = None, steps: int = 3,
             target: float = DEFAULT_TARGET, lr: float = 1e-2, candidates: Sequence[str] | None = None,
             gains: bool = True, name: str | None = None, log: Callable[[str], None] | None = None,
             jit: bool | None = None) -> DiagnoseReport:
    """Which modules of the linen ``model`` break under ``policy``, ranked, and the policy with
    the fewest promotions that brings the error under ``target``; the same report as
    `dualprec_torch.diagnose`.

    ``variables``: float32 linen variables ({"params": ...}).  ``batch``: (inputs, targets)
    or a list of them (one per step, cycled).  ``loss_fn(output, targets)``: default cross
    entropy over the output's last axis.  ``jit``: jit each variant's step (default: eager,
    see `JIT`)."""
    import flax.linen as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose(model, variables, ...): expected a flax.linen Module, got {type(model).__name__}")
    if steps < 1:
        raise ValueError(f"diagnose: steps={steps} must be at least 1")
    policy = Policy.parse(policy)
    variables = variables if "params" in variables else {"params": variables}
    x0 = _batches(batch, 1)[0][0]
    modules = module_list(model, variables, x0)
    run = runner(model, variables, batch, loss_fn=loss_fn, steps=steps, lr=lr, jit=jit)
    return search(run, policy, modules, target=target, backend="jax", model=name or type(model).__name__,
                  steps=steps, weights=dense_weights(variables["params"]), candidates=candidates, gains=gains,
                  log=log)
