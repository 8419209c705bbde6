"""Native FP8 matmuls for JAX: real float8 operands in `lax.dot_general`, delayed or current
scaling, the recipe of `dualprec.ref.fp8` bit for bit.

The dot quantizes both operands (clip to +-fp8_max, then cast: the spec's saturating cast)
and multiplies the float8 arrays with ``preferred_element_type=float32``, which XLA runs as an
FP8 GEMM on Hopper; the product is rescaled by the two inverse scales.  Its custom VJP
quantizes the output gradient (E5M2 under "hybrid", E4M3 under "e4m3") and runs both gradient
GEMMs on float8 operands too.

Delayed scaling keeps, per layer and role (input, weight, grad_output), a float32 scale and an
amax history in the Flax collection `FP8_COLLECTION` (Flax's ``_overwrite_with_gradient``:
`flax.training.train_state.TrainState` already overwrites it with its gradient, and the
optimizer never sees it).  The "gradient" of that state is its next value: differentiate the
loss with respect to the collection and store the result (`apply_fp8_grads`).

What the collection stores: ``<role>_amax_history`` is the reference's history;
``<role>_scale`` is the scale the last step quantized with.  The scale for the next step is a
pure function of the two (`next_scale`), computed at the start of the step that uses it; so a
layer called several times in one step sees one scale, records the max of its amaxes (the
state is read through Flax's max-accumulating ``fp32_max_grad`` dtype, see `max_accumulating`),
and the history rolls once per step.  `state_tensors` reports the reference's scale (the next
one), so the names and numbers equal the torch backend's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dualprec.errors import PolicyError, UnsupportedPolicyError
from dualprec.policy import FP8Recipe, Policy
from dualprec.ref.casts import FP8_MAX
from dualprec.ref.fp8 import ROLES, role_format

from .ops import _einsum_subscripts, _freeze, as_written

__all__ = ["FP8_COLLECTION", "Fp8DotGeneral", "fp8_dot_general", "current_dot_general", "init_meta",
           "next_scale", "quantize", "max_accumulating", "apply_fp8_grads", "split_fp8",
           "state_tensors", "load_state_tensors", "autocast", "engine", "recipe_of",
           "FP8_MODULES", "setup_nnx", "nnx_apply_fp8_grads", "Fp8Meta", "Fp8NnxDot"]

FP8_COLLECTION = "_overwrite_with_gradient"  # Flax's name (TrainState overwrites it)
_BLOCK_KEY = "blockscale_state"  # dualprec_jax.blockscale.STATE_KEY
_OP_NAME = "fp8"  # the submodule of a Dense that owns its state: <layer>/fp8/<role>_scale
_FIELDS = ("scale", "amax_history")
_RECIPE, _ALGOS, _FORMATS = "recipe", ("max", "most_recent"), ("hybrid", "e4m3")
_JNP = {"float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}

try:  # Flax's float32 whose autodiff sum is a max (reused layers); present since Flax 0.8
    from flax.linen.fp8_ops import fp32_max_grad as _FM32
except ImportError:  # pragma: no cover - older Flax: reuse sums (documented)
    _FM32 = None


def _recipe(recipe) -> FP8Recipe:
    if isinstance(recipe, dict):
        recipe = FP8Recipe(**recipe)
    elif isinstance(recipe, str):
        recipe = FP8Recipe(scaling=recipe)
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"recipe must be a dualprec FP8Recipe (Policy.fp8), got {type(recipe).__name__}")
    if recipe.block_scaled:
        raise UnsupportedPolicyError(f"fp8={recipe.scaling}: Precision's Flax FP8 layers run per-tensor scaling "
                                     "(delayed, current) only; call dualprec_jax.blockscale.block_linear "
                                     "for block-scaled recipes")
    return recipe


def _is_fm32(x) -> bool:
    return _FM32 is not None and getattr(x, "dtype", None) == _FM32


def _to_f32(x):
    return lax.convert_element_type(x, jnp.float32) if _is_fm32(x) else jnp.asarray(x, jnp.float32)


# ----- the recipe, in jnp (bit-identical to dualprec.ref.fp8) ----------------------------
def _scale_from_amax(a, previous, fmt: str, margin: int):
    s = jnp.float32(FP8_MAX[fmt]) / a
    s = s / jnp.float32(2.0**margin)
    return jnp.where(jnp.isfinite(a) & (a > 0), s, previous).astype(jnp.float32)


def _reduce(history, recipe: FP8Recipe):
    return jnp.max(history) if recipe.amax_algo == "max" else history[0]


def next_scale(scale, history, role: str, recipe) -> jax.Array:
    """The scale the next step quantizes `role` with: the reference's scale after its update."""
    recipe = _recipe(recipe)
    history = _to_f32(history)
    return _scale_from_amax(_reduce(history, recipe), _to_f32(scale), role_format(role, recipe),
                            int(recipe.margin))


def _amax(x):
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def _record(history, a):
    return jnp.roll(history, -1).at[0].set(a)


def quantize(x, scale, fmt: str):
    """Saturating cast of float32(x * scale) to `fmt` (a float8 array)."""
    limit = jnp.float32(FP8_MAX[fmt])
    return jnp.clip(x.astype(jnp.float32) * scale, -limit, limit).astype(_JNP[fmt])


def _current_scale(x, fmt: str):
    return _scale_from_amax(_amax(x), jnp.float32(1.0), fmt, 0)


def init_meta(recipe, roles=ROLES) -> dict:
    """Fresh delayed-scaling state: scale 1 and an all-zero history per role, and the recipe's
    margin, amax_algo and format as numbers (``recipe``: what `state_tensors` needs to give
    the next scale; it passes through every step unchanged)."""
    recipe = _recipe(recipe)
    meta = {f"{role}_{f}": (jnp.ones((), jnp.float32) if f == "scale"
                            else jnp.zeros((int(recipe.history_len),), jnp.float32))
            for role in roles for f in _FIELDS}
    meta[_RECIPE] = jnp.asarray([recipe.margin, _ALGOS.index(recipe.amax_algo), _FORMATS.index(recipe.format)],
                                jnp.float32)
    return meta


def _recipe_from_meta(fields) -> FP8Recipe:
    code = np.asarray(jax.device_get(_to_f32(fields[_RECIPE])))
    history_len = int(np.shape(fields["input_amax_history"])[0])
    return FP8Recipe(history_len=history_len, margin=int(code[0]), amax_algo=_ALGOS[int(code[1])],
                     format=_FORMATS[int(code[2])])


# ----- the FP8 dot ---------------------------------------------------------------------
def _fp8_dot(a, b, dims):
    if jax.default_backend() == "cpu":
        # XLA:CPU upcasts anyway; products of float8 values are exact in float32.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


_fp8_dot_as_written = as_written(_fp8_dot, static_argnums=(2,))


def _fp8_matmul(a, b, dims):
    """dot_general of two float8 arrays accumulated in float32 (an FP8 GEMM on Hopper), a
    region autocast leaves as written (its float32 result is not rounded to the compute dtype)."""
    return _fp8_dot_as_written(a, b, dims)


def _transposes(g, lhs, rhs, dims):
    """(d_lhs, d_rhs) of dot_general(lhs, rhs, dims) for the cotangent g (float8 operands)."""
    (lc, rc), (lb, rb) = dims
    n = len(lc)
    if not lb and lc == tuple(range(lhs.ndim - n, lhs.ndim)) and rc == tuple(range(n)):
        n_out, n_batch = rhs.ndim - n, lhs.ndim - n
        d_lhs = _fp8_matmul(g, rhs, ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n, rhs.ndim))), ((), ())))
        d_rhs = _fp8_matmul(lhs, g, ((tuple(range(n_batch)), tuple(range(n_batch))), ((), ())))
        return d_lhs, d_rhs
    sl, sr, so = _einsum_subscripts(lhs.ndim, rhs.ndim, dims)
    if jax.default_backend() == "cpu":
        g, lhs, rhs = (t.astype(jnp.float32) for t in (g, lhs, rhs))
    d_lhs = jnp.einsum(f"{so},{sr}->{sl}", g, rhs, preferred_element_type=jnp.float32)
    d_rhs = jnp.einsum(f"{so},{sl}->{sr}", g, lhs, preferred_element_type=jnp.float32)
    return d_lhs, d_rhs


@functools.lru_cache(maxsize=None)
def _delayed_dot(dims, recipe: FP8Recipe, max_dtype: bool):
    fx, fw, fg = (role_format(r, recipe) for r in ROLES)

    def forward(lhs, rhs, meta):
        m = {k: _to_f32(v) for k, v in meta.items()}
        scales = {r: next_scale(m[f"{r}_scale"], m[f"{r}_amax_history"], r, recipe) for r in ROLES}
        xq, wq = quantize(lhs, scales["input"], fx), quantize(rhs, scales["weight"], fw)
        inv_x, inv_w = jnp.float32(1) / scales["input"], jnp.float32(1) / scales["weight"]
        y = _fp8_matmul(xq, wq, dims) * (inv_x * inv_w)
        new = {"input_scale": scales["input"], "weight_scale": scales["weight"], _RECIPE: m[_RECIPE],
               "input_amax_history": _record(m["input_amax_history"], _amax(lhs)),
               "weight_amax_history": _record(m["weight_amax_history"], _amax(rhs))}
        return y, (xq, wq, inv_x, inv_w, scales["grad_output"], m["grad_output_amax_history"], new)

    @jax.custom_vjp
    def dot(lhs, rhs, meta):
        return forward(lhs, rhs, meta)[0]

    def fwd(lhs, rhs, meta):
        y, res = forward(lhs, rhs, meta)
        # 0-d arrays carry the operand and state dtypes into the backward pass
        return y, (res, (jnp.zeros((), lhs.dtype), jnp.zeros((), rhs.dtype)))

    def bwd(saved, g):
        (xq, wq, inv_x, inv_w, s_g, h_g, new), (lhs_like, rhs_like) = saved
        gq = quantize(g, s_g, fg)
        inv_g = jnp.float32(1) / s_g
        d_lhs, d_rhs = _transposes(gq, xq, wq, dims)
        new = {**new, "grad_output_scale": s_g, "grad_output_amax_history": _record(h_g, _amax(g))}
        d_meta = {k: (lax.convert_element_type(v, _FM32) if max_dtype else v) for k, v in new.items()}
        return ((d_lhs * (inv_g * inv_w)).astype(lhs_like.dtype),
                (d_rhs * (inv_x * inv_g)).astype(rhs_like.dtype), d_meta)

    dot.defvjp(fwd, bwd)
    return dot


@functools.lru_cache(maxsize=None)
def _current_dot(dims, recipe: FP8Recipe):
    fx, fw, fg = (role_format(r, recipe) for r in ROLES)

    def forward(lhs, rhs):
        sx, sw = _current_scale(lhs, fx), _current_scale(rhs, fw)
        xq, wq = quantize(lhs, sx, fx), quantize(rhs, sw, fw)
        inv_x, inv_w = jnp.float32(1) / sx, jnp.float32(1) / sw
        return _fp8_matmul(xq, wq, dims) * (inv_x * inv_w), (xq, wq, inv_x, inv_w)

    @jax.custom_vjp
    def dot(lhs, rhs):
        return forward(lhs, rhs)[0]

    def fwd(lhs, rhs):
        y, res = forward(lhs, rhs)
        return y, (res, jnp.zeros((), lhs.dtype), jnp.zeros((), rhs.dtype))

    def bwd(saved, g):
        (xq, wq, inv_x, inv_w), lhs_like, rhs_like = saved
        sg = _current_scale(g, fg)
        inv_g = jnp.float32(1) / sg
        d_lhs, d_rhs = _transposes(quantize(g, sg, fg), xq, wq, dims)
        return ((d_lhs * (inv_g * inv_w)).astype(lhs_like.dtype),
                (d_rhs * (inv_x * inv_g)).astype(rhs_like.dtype))

    dot.defvjp(fwd, bwd)
    return dot


def fp8_dot_general(lhs, rhs, dimension_numbers, meta=None, recipe: Any = None):
    """One FP8 dot_general (float32 result).  Delayed scaling needs ``meta`` (the layer's state,
    `init_meta`); its cotangent is the state's next value.  Current scaling takes no state."""
    recipe = _recipe(recipe if recipe is not None else FP8Recipe())
    dims = _freeze(dimension_numbers)
    if recipe.scaling == "current":
        return _current_dot(dims, recipe)(lhs, rhs)
    if meta is None:
        raise ValueError("delayed scaling needs the layer's FP8 state (meta=init_meta(recipe))")
    meta = dict(meta)
    max_dtype = any(_is_fm32(v) for v in meta.values())
    if max_dtype:  # all or none: the backward pass writes one dtype
        meta = {k: v if _is_fm32(v) else lax.convert_element_type(jnp.asarray(v, jnp.float32), _FM32)
                for k, v in meta.items()}
    return _delayed_dot(dims, recipe, max_dtype)(lhs, rhs, meta)


def current_dot_general(recipe: Any = "current"):
    """A stateless Flax-compatible ``dot_general`` with current scaling (float32 result)."""
    recipe = _recipe(recipe)
    if recipe.scaling != "current":
        raise ValueError("current_dot_general() is stateless: it takes current scaling only; "
                         "delayed scaling keeps state (Fp8DotGeneral)")

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        del precision, preferred_element_type, kw  # FP8 GEMMs accumulate in float32
        return fp8_dot_general(lhs, rhs, dimension_numbers, recipe=recipe)

    return dot_general


# ----- Flax linen ----------------------------------------------------------------------
class Fp8DotGeneral(nn.Module):
    """``dot_general_cls`` of a Dense/DenseGeneral: the FP8 dot with its state in
    `FP8_COLLECTION` (delayed scaling) or without state (current scaling)."""

    recipe: FP8Recipe = FP8Recipe()

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        recipe = _recipe(self.recipe)
        if recipe.scaling == "current":
            return fp8_dot_general(_input_source(lhs), _weight_source(rhs), dimension_numbers, recipe=recipe)
        fresh = init_meta(recipe)
        meta = {k: self.variable(FP8_COLLECTION, k, lambda v=v: v).value for k, v in fresh.items()}
        for k, v in meta.items():
            if v.shape != fresh[k].shape:
                raise ValueError(f"FP8 state {'/'.join(map(str, self.path))}/{k} has shape {v.shape}, but "
                                 f"the recipe's history_len gives {fresh[k].shape}")
        return fp8_dot_general(_input_source(lhs), _weight_source(rhs), dimension_numbers, meta, recipe)


# The parameter and the input a Dense is about to multiply, before Flax casts them to the
# compute dtype: the FP8 dot quantizes the weight from the parameter itself and the input as
# the layer received it (Transformer Engine's rule, and the torch engine's), not from their
# compute-dtype copies.  Set by the interceptor around one call.
_PARAM_STACK: list = []
_INPUT_STACK: list = []
#: the input an nnx FP8 layer received before dualprec_jax.flax_nnx cast it to the compute
#: dtype (pushed by that wrapper, read by Fp8NnxLinear)
_NNX_RAW_INPUT: list = []


def _input_source(lhs):
    if _INPUT_STACK:
        x = _INPUT_STACK[-1]
        if x is not None and getattr(x, "shape", None) == lhs.shape and jnp.issubdtype(x.dtype, jnp.floating):
            return x
    return lhs


def _weight_source(rhs):
    """The stored kernel in place of its compute-dtype copy ``rhs`` when one is known and has
    ``rhs``'s shape (the gradient then flows to the parameter directly, in its dtype)."""
    if _PARAM_STACK:
        kernel = _PARAM_STACK[-1]
        if kernel is not None and getattr(kernel, "shape", None) == rhs.shape:
            return kernel
    return rhs


def max_accumulating(variables):
    """``variables`` with the FP8 state in Flax's max-accumulating dtype, so a layer reused in
    one step records the max of its amaxes (autodiff would sum them).  Call it inside the
    differentiated function, once, before ``apply`` (`dualprec_jax.Precision.apply` does)."""
    if _FM32 is None or FP8_COLLECTION not in variables:
        return variables
    conv = lambda x: x if _is_fm32(x) else lax.convert_element_type(jnp.asarray(x, jnp.float32), _FM32)
    return {**variables, FP8_COLLECTION: jax.tree_util.tree_map(conv, variables[FP8_COLLECTION])}


_CONVERTED: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()


def _max_dtype_once(value):
    """A traced state value in the max-accumulating dtype, converted once per value: every
    call of a reused nnx layer in one trace fans out from the same converted tracer (so its
    gradients combine with max), and the variable itself keeps its float32 value."""
    if _FM32 is None or _is_fm32(value) or not isinstance(value, jax.core.Tracer):
        return value
    hit = _CONVERTED.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    out = lax.convert_element_type(value, _FM32)
    _CONVERTED[id(value)] = (value, out)
    while len(_CONVERTED) > 512:  # tracers of finished traces: only the newest can recur
        _CONVERTED.popitem(last=False)
    return out


def split_fp8(variables):
    """(variables without the FP8 state, the FP8 state or {})."""
    rest = {k: v for k, v in variables.items() if k != FP8_COLLECTION}
    return rest, variables.get(FP8_COLLECTION, {})


def apply_fp8_grads(variables, grads):
    """``variables`` with its FP8 state replaced by that state's gradient (its next value).
    ``grads`` is the gradient of the whole variables dict or of the FP8 collection alone."""
    fp8_grads = grads.get(FP8_COLLECTION, grads) if isinstance(grads, dict) else grads
    if FP8_COLLECTION not in variables:
        return variables
    return {**variables, FP8_COLLECTION: jax.tree_util.tree_map(_to_f32, fp8_grads)}


FP8_MODULES = (nn.Dense, nn.DenseGeneral)


def recipe_of(policy: Policy, path: str) -> FP8Recipe | None:
    return policy.for_module(path).fp8


def _intercept(policy: Policy, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, FP8_MODULES):
        return next_fun(*args, **kwargs)
    recipe = recipe_of(policy, ".".join(str(p) for p in module.path))
    if recipe is None or module.dot_general is not None or module.dot_general_cls is not None:
        return next_fun(*args, **kwargs)  # not under FP8, or the user chose their own dot
    if recipe.block_scaled:  # row-wise / MXFP8 / NVFP4 (docs/block-scaling.md)
        from .blockscale import BlockDotGeneral

        cls = functools.partial(BlockDotGeneral, recipe=recipe, layer=".".join(str(p) for p in module.path),
                                name=_OP_NAME)
    else:
        cls = functools.partial(Fp8DotGeneral, recipe=recipe, name=_OP_NAME)
    object.__setattr__(module, "dot_general_cls", cls)
    kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
    _PARAM_STACK.append(kernel)
    _INPUT_STACK.append(args[0] if args else kwargs.get("inputs"))
    try:
        return next_fun(*args, **kwargs)
    finally:
        _PARAM_STACK.pop()
        _INPUT_STACK.pop()
        object.__setattr__(module, "dot_general_cls", None)


def engine(policy: Policy, caps=None) -> str | None:
    """The FP8 engine the policy resolves to on ``caps`` ("native" | "transformer-engine")."""
    from dualprec.capabilities import resolve_fp8_engine

    top = policy if policy.fp8 is not None else next((p for _, p in policy.overrides if p.fp8 is not None), None)
    if top is None:
        return None
    if caps is None:
        from .caps import device_caps
        caps = device_caps()
    which = resolve_fp8_engine(top, caps)
    if which == "transformer-engine" and top.fp8.engine == "auto" and top.fp8.block_scaled:
        from . import te

        if not te.supports(top.fp8):  # an older TE-JAX without the recipe: the native engine runs it
            return "native"
    return which


@contextlib.contextmanager
def autocast(policy: Policy, inner=None, caps=None):
    """Context manager: stock nn.Dense / nn.DenseGeneral under an FP8 policy (or override) run
    the FP8 dot (the native one, or Transformer Engine's when the engine resolves to it on
    ``caps``).  ``inner``: another context (the op-policy interceptor) entered inside."""
    policy = Policy.parse(policy)
    with contextlib.ExitStack() as stack:
        which = engine(policy, caps) if policy.uses_fp8 else None
        if which == "transformer-engine":
            from . import te

            stack.enter_context(te.autocast(policy))
        elif which is not None:
            stack.enter_context(nn.intercept_methods(functools.partial(_intercept, policy)))
        if inner is not None:
            stack.enter_context(inner)
        yield


# ----- Flax nnx ------------------------------------------------------------------------
try:
    from flax import nnx

    class Fp8Meta(nnx.Variable):
        """nnx variable type of the FP8 state (differentiate with respect to it and overwrite)."""

    class Fp8NnxDot(nnx.Module):
        """The ``dot_general`` of an nnx.Linear under FP8: owns the layer's state.  Under a
        block-scaled recipe (docs/block-scaling.md) the state is the linen layer's
        (`dualprec_jax.blockscale.BlockDotGeneral`): ``blockscale_state`` = [seed high 16
        bits, seed low 16 bits, step] in float32, the seed `layer_seed` of the layer's path,
        and the three GEMMs are the same custom-VJP function, so nnx and linen compute the
        same bits."""

        def __init__(self, recipe: FP8Recipe, layer: str = ""):
            if isinstance(recipe, FP8Recipe) and recipe.block_scaled:
                from .blockscale import _state_init, layer_seed

                self.fp8_recipe, self.layer = recipe, layer
                self.blockscale_state = Fp8Meta(_state_init(layer_seed(layer)))
                return
            self.fp8_recipe = _recipe(recipe)
            if self.fp8_recipe.scaling == "delayed":
                for k, v in init_meta(self.fp8_recipe).items():
                    setattr(self, k, Fp8Meta(v))

        def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
            # the parameter and the input as the layer received them (docs/fp8.md's rule), not
            # the compute-dtype copies nnx.Linear hands its dot (Fp8NnxLinear records them)
            lhs, rhs = _input_source(lhs), _weight_source(rhs)
            if self.fp8_recipe.block_scaled:
                from .blockscale import _state_dot

                dims = _freeze(dimension_numbers)
                if dims != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
                    raise UnsupportedPolicyError(
                        f"fp8={self.fp8_recipe.scaling}: block-scaled layers take nnx.Linear (one contracting "
                        f"axis); {self.layer or 'this layer'} has dimension numbers {dims}")
                state = self.blockscale_state.get_value()
                y = _state_dot(lhs.reshape(-1, lhs.shape[-1]), rhs.T, state, self.fp8_recipe)
                return y.reshape(lhs.shape[:-1] + (rhs.shape[1],))
            if self.fp8_recipe.scaling == "current":
                return fp8_dot_general(lhs, rhs, dimension_numbers, recipe=self.fp8_recipe)
            meta = {}
            for k in init_meta(self.fp8_recipe):
                var = getattr(self, k)
                meta[k] = _max_dtype_once(var.get_value())
            return fp8_dot_general(lhs, rhs, dimension_numbers, meta, self.fp8_recipe)

    class Fp8NnxLinear(nnx.Linear):
        """An nnx.Linear under FP8 (`setup_nnx` gives a layer this class in place): its call
        records the stored kernel and the input for its dot, which quantizes them instead of
        their compute-dtype copies, as the linen interceptor does."""

        def __call__(self, inputs, *args, **kwargs):
            _PARAM_STACK.append(self.kernel.get_value())
            _INPUT_STACK.append(_NNX_RAW_INPUT[-1] if _NNX_RAW_INPUT else inputs)
            try:
                return super().__call__(inputs, *args, **kwargs)
            finally:
                _PARAM_STACK.pop()
                _INPUT_STACK.pop()

except ImportError:  # pragma: no cover
    Fp8Meta = Fp8NnxDot = Fp8NnxLinear = None


def setup_nnx(model, policy: Policy):
    """Give each nnx.Linear under an FP8 policy (or override) the FP8 dot, in place."""
    from flax import nnx as _nnx

    policy = Policy.parse(policy)
    if not policy.uses_fp8:
        return model
    forced = sorted({q.fp8.scaling for _, q in policy.policies()
                     if q.fp8 is not None and q.fp8.engine == "transformer-engine"})
    if forced:
        raise UnsupportedPolicyError(f"fp8={forced[0]}(engine=transformer-engine): nnx models run the native FP8 "
                                     "layers (TE's Flax layers are linen); use engine=native or auto for nnx, "
                                     "or a linen model for TE")
    todo = []
    for keys, node in _nnx.iter_graph(model):
        if isinstance(node, _nnx.Linear):
            path = ".".join(str(k) for k in keys)
            recipe = recipe_of(policy, path)
            if recipe is not None and getattr(node, "dot_general", None) in (None, lax.dot_general):
                todo.append((node, recipe, path))
        elif isinstance(node, (_nnx.LinearGeneral, _nnx.Einsum)):
            path = ".".join(str(k) for k in keys)
            recipe = recipe_of(policy, path)
            if recipe is not None:  # never left unquantized without a word
                raise UnsupportedPolicyError(
                    f"fp8={recipe.scaling}: nnx FP8 layers take nnx.Linear (one contracting axis); "
                    f"{path} is an nnx.{type(node).__name__}: keep it out of the recipe with an override "
                    f"(@{path}=(fp8=none)) or use nnx.Linear")
    for node, recipe, path in todo:
        node.dot_general = _nnx.data(Fp8NnxDot(recipe, path))
        if type(node) is _nnx.Linear:  # a subclass keeps its own __call__ (and the copies)
            node.__class__ = Fp8NnxLinear
    return model


def nnx_apply_fp8_grads(model, grads):
    """Overwrite each Fp8Meta of an nnx model with its gradient (its next value)."""
    from flax import nnx as _nnx

    flat = dict(_nnx.to_flat_state(grads)) if not isinstance(grads, dict) else grads
    for keys, node in _nnx.iter_graph(model):
        if isinstance(node, Fp8Meta):
            g = flat.get(tuple(keys))
            if g is not None:
                node.set_value(_to_f32(g.get_value() if hasattr(g, "get_value") else g))
            elif _is_fm32(node.get_value()):
                node.set_value(_to_f32(node.get_value()))
    return model


# ----- state: flat names shared with the torch backend -----------------------------------
def _flat(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            yield from _flat(v, prefix + (str(k),))
    else:
        yield prefix, tree


def _layer_roles(entries):
    """{layer path: {key: value}} from (path tuple, value) pairs of FP8 state."""
    layers: dict[str, dict] = {}
    for path, value in entries:
        *owner, key = path
        if owner and owner[-1] in (_OP_NAME, "dot_general"):
            owner = owner[:-1]
        layers.setdefault(".".join(owner), {})[key] = value
    return layers


def _name(layer: str, role: str, field: str) -> str:
    """``fp8.<layer>.<role>.<field>``; a model that is a single layer has no path."""
    return ".".join(p for p in ("fp8", layer, role, field) if p)


def _recipe_for(recipes, layer: str, fields) -> FP8Recipe:
    if recipes is None:
        if _RECIPE in fields:
            return _recipe_from_meta(fields)
        recipes = FP8Recipe()
    if isinstance(recipes, Policy):
        r = recipes.for_module(layer).fp8
        if r is None:
            raise ValueError(f"layer {layer!r} has FP8 state, but the policy gives it no fp8 recipe")
        return r
    return _recipe(recipes)


def state_tensors(variables, recipe: Any = None) -> dict[str, np.ndarray]:
    """The FP8 state as flat tensors ``fp8.<layer>.<role>.<scale|amax_history>`` with the
    reference's meaning (scale: the one the next step uses), the torch backend's names.
    ``variables``: linen variables (or their FP8 collection) or an nnx model; ``recipe``: the
    FP8Recipe or the Policy (default: the recipe each layer's state records)."""
    entries = _state_entries(variables)
    out = {}
    for layer, fields in sorted(_layer_roles(entries).items()):
        if _BLOCK_KEY in fields:  # a block-scaled layer: int64 [seed, step], torch's name
            st = np.asarray(jax.device_get(_to_f32(fields[_BLOCK_KEY])), np.float64).astype(np.int64)
            out[_name(layer, "blockscale", "state")] = np.array([st[0] * 65536 + st[1], st[2]], np.int64)
            continue
        r = _recipe_for(recipe, layer, fields)
        for role in ROLES:
            if f"{role}_scale" not in fields:
                continue
            hist = np.array(jax.device_get(_to_f32(fields[f"{role}_amax_history"])), np.float32)
            scale = np.array(jax.device_get(next_scale(fields[f"{role}_scale"], hist, role, r)), np.float32)
            out[_name(layer, role, "scale")] = scale.reshape(())
            out[_name(layer, role, "amax_history")] = hist
    return out


def _state_entries(variables):
    try:
        from flax import nnx as _nnx
        if isinstance(variables, _nnx.Module):
            return [(tuple(str(k) for k in keys), node.get_value())
                    for keys, node in _nnx.iter_graph(variables) if isinstance(node, Fp8Meta)]
    except ImportError:  # pragma: no cover
        pass
    tree = variables.get(FP8_COLLECTION, None) if FP8_COLLECTION in variables else variables
    if tree is None:
        return []
    if "params" in variables and FP8_COLLECTION not in variables:
        return []
    return list(_flat(tree))


def load_state_tensors(variables, tensors: dict, recipe: Any = None):
    """``variables`` (linen dict; an nnx model is updated in place and returned) with the FP8
    state read from ``tensors`` (names of `state_tensors`).  Refuses, naming the layers, FP8
    state for a run without FP8 (or for other layers) and a run with FP8 given no FP8 state:
    either would train on stale or default scales."""
    given = {k: v for k, v in tensors.items() if k.startswith("fp8.")}
    entries = _state_entries(variables)
    layers = _layer_roles(entries)
    expected = {_name(layer, role, f) for layer, fields in layers.items() for role in ROLES
                if f"{role}_scale" in fields for f in _FIELDS}
    expected |= {_name(layer, "blockscale", "state") for layer, fields in layers.items() if _BLOCK_KEY in fields}
    if given and not expected:
        raise PolicyError(f"the checkpoint holds FP8 state ({len(given)} tensors, e.g. {sorted(given)[0]}), "
                         "but this run has no delayed-scaling FP8 layers; load it into a run under the "
                         "same FP8 policy, or drop the fp8.* tensors on purpose")
    if expected and not given:
        raise PolicyError("this run has delayed-scaling FP8 layers, but the checkpoint holds no FP8 state "
                         f"(no fp8.* tensors; expected e.g. {sorted(expected)[0]}): its scales would "
                         "restart from 1.0; resume from an FP8 checkpoint or start the FP8 run fresh")
    if set(given) != expected:
        missing, extra = sorted(expected - set(given)), sorted(set(given) - expected)
        raise PolicyError(f"FP8 state does not match this model: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, value in given.items():
        *owner, role, field = name.split(".")[1:]
        layer = ".".join(owner)
        if role == "blockscale":
            if np.size(value) != 2:
                raise PolicyError(f"{name} must hold [seed, step], got shape {np.shape(value)}")
            continue
        cur = _to_f32(layers[layer][f"{role}_{field}"])
        if np.shape(value) != tuple(cur.shape) and not (field == "scale" and np.size(value) == 1):
            raise PolicyError(f"{name} has shape {np.shape(value)}, this run's has {tuple(cur.shape)} "
                             "(another history_len?)")

    def new_value(path, old):
        *owner, key = path
        if key == _RECIPE:
            return old
        if owner and owner[-1] in (_OP_NAME, "dot_general"):
            owner = owner[:-1]
        if key == _BLOCK_KEY:
            seed, step = (int(v) for v in np.asarray(given[_name(".".join(owner), "blockscale", "state")]).reshape(2))
            return jnp.asarray([seed >> 16, seed & 0xFFFF, step], jnp.float32)
        role, field = next((r, key[len(r) + 1:]) for r in ROLES if key.startswith(r + "_"))
        arr = np.asarray(given[_name(".".join(owner), role, field)], np.float32)
        return jnp.asarray(arr.reshape(()) if field == "scale" else arr)

    try:
        from flax import nnx as _nnx
        if isinstance(variables, _nnx.Module):
            for keys, node in _nnx.iter_graph(variables):
                if isinstance(node, Fp8Meta):
                    node.set_value(new_value(tuple(str(k) for k in keys), node.get_value()))
            return variables
    except ImportError:  # pragma: no cover
        pass
    tree = variables[FP8_COLLECTION]
    new_tree = jax.tree_util.tree_map_with_path(
        lambda p, x: new_value(tuple(str(getattr(k, "key", k)) for k in p), x), dict(tree))
    return {**variables, FP8_COLLECTION: new_tree}
