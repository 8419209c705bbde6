"""FP8 linear layers in torch: the native engine (`torch._scaled_mm`) and engine selection.

`convert_module(model, policy)` replaces each `nn.Linear` whose policy has an FP8 recipe by
a new `FP8Linear` in its parent (a module swap: the same Parameter objects, the old layer's
hooks, the same path; the old `nn.Linear` object itself is not changed), or hands the model
to the Transformer Engine adapter (`dualprec_torch.te`) when the engine resolves to it.

An `FP8Linear` runs its three GEMMs on FP8 operands: input and weight in E4M3, the output
gradient in E5M2 under the "hybrid" format (E4M3 under "e4m3"). Every cast is saturating
(clip to +-fp8_max, then cast) and the numbers are those of `dualprec.ref.fp8`:

* delayed scaling (Transformer Engine's DelayedScaling): a step quantizes the input, the
  weight and the output gradient with the scales held in the layer's state, then records
  their amaxes and computes the next scales. One step is one forward/backward pass (the
  JAX engine's step): every call of a layer before its backward (a reused layer: several)
  quantizes with the step's scales, each call's backward records its amaxes, combined with
  max within the step, and the history rolls once; the next training forward after a
  backward begins the next step. Calls whose backward never runs (no_grad, eval mode)
  record nothing.
* current scaling: every tensor is scaled by fp8_max / its own amax (amax 0 -> scale 1).

The state of a delayed-scaling layer (per role: a float32 scale and an amax history, newest
first) lives in two int32 buffers holding the float32 bit patterns. Being integer, they are
left alone by every dtype cast (`model.to(bfloat16)`, `.half()`, the policy's parameter
casts), so a scale is never rounded through bfloat16; `state_tensors` gives them back as
float32. Outputs come out in the compute dtype: the autocast dtype inside an autocast,
the input's dtype otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import torch
from torch import nn

from dualprec.errors import PolicyError, UnsupportedPolicyError
from dualprec.policy import FP8Recipe
from dualprec.ref.casts import FP8_MAX
from dualprec.ref.fp8 import ROLES, role_format

__all__ = [
    "FP8Linear", "convert_module", "select_engine", "fp8_layers", "state_tensors", "load_state_tensors",
    "check_device", "init_context", "FP8_MIN_CAPABILITY",
]

#: FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FP8_MIN_CAPABILITY = (8, 9)

_TORCH_FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_INPUT, _WEIGHT, _GRAD = (ROLES.index(r) for r in ("input", "weight", "grad_output"))


# --------------------------------------------------------------------------- recipe numerics

def _amax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as a float32 scalar tensor (NaN when t holds one; max propagates NaN)."""
    return t.detach().abs().amax().to(torch.float32)


def _div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """float32(numerator / t), correctly rounded in eager mode and under torch.compile alike.

    The division runs in float64 and is rounded once to float32: a float64 quotient of
    float32 operands, rounded to float32, is the correctly rounded float32 quotient, while
    compiled float32 division may be approximate on a GPU (torchao works around the same).
    A tensor numerator on purpose: ``448.0 / t`` is ``t.reciprocal() * 448`` in torch.
    """
    wide = t.to(torch.float64)
    return (torch.full_like(wide, numerator) / wide).to(torch.float32)


def _scale_from_amax(amax: torch.Tensor, previous: torch.Tensor, fp8_max: float, margin: int) -> torch.Tensor:
    """(fp8_max / amax) / 2**margin in float32; the previous scale when amax is 0 or not finite."""
    scale = _div(fp8_max, amax)
    if margin:
        scale = scale * (2.0 ** -margin)  # exact, as the reference's division by 2**margin
    return torch.where(torch.isfinite(amax) & (amax > 0), scale, previous)


def _quantize(t: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Saturating cast of float32(t) * scale to ``fmt``."""
    fp8_max = FP8_MAX[fmt]
    return (t.detach().to(torch.float32) * scale).clamp(-fp8_max, fp8_max).to(_TORCH_FP8[fmt])


_STALE = len(ROLES)  # fp8_step_flags[_STALE] == 1: the next training forward begins a step


def _record(state, role: int, amax: torch.Tensor, recipe: FP8Recipe, fmt: str) -> None:
    """Record ``role``'s amax for the current step and store the next scale (in place).

    The step's first record of a role shifts its history left by one and writes ``amax`` at
    index 0; a later record in the same step (a reused layer) takes the max with entry 0, so
    the history rolls once per step (Flax's fp32_max_grad, the JAX engine's rule). The next
    scale comes from the reduced history, falling back to the scale the step used.
    """
    scale_bits, history_bits, step_bits, flags = state
    old = history_bits[role].view(torch.float32)
    amax = amax.reshape(1)
    rolled = torch.cat([amax, torch.roll(old, -1)[1:]])
    merged = torch.cat([torch.maximum(old[:1], amax), old[1:]])
    history = torch.where(flags[role] == 0, rolled, merged)
    reduced = history.amax() if recipe.amax_algo == "max" else history[0]
    scale = _scale_from_amax(reduced, step_bits[role].view(torch.float32), FP8_MAX[fmt], recipe.margin)
    history_bits[role].copy_(history.view(torch.int32))
    scale_bits[role].copy_(scale.view(torch.int32))
    flags[role].fill_(1)


def _begin_step(state) -> None:
    """A new step when the last one is closed: its scales are the stored (next) scales and no
    role has recorded yet. Tensor ops only (no host sync, no graph break)."""
    scale_bits, _, step_bits, flags = state
    stale = flags[_STALE] != 0
    step_bits.copy_(torch.where(stale, scale_bits, step_bits))
    flags.copy_(torch.where(stale, torch.zeros_like(flags), flags))


def _in_backward() -> bool:
    """True inside a backward pass (an activation-checkpoint recompute): it never begins a step."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    if task is None or torch.compiler.is_compiling():
        return False
    return task() != -1


def _current_scale(t: torch.Tensor, fmt: str) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=t.device)
    return _scale_from_amax(_amax(t), one, FP8_MAX[fmt], 0)


# --------------------------------------------------------------------------- GEMM

def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    out = torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _round16(n: int) -> int:
    return -(-n // 16) * 16


@functools.lru_cache(maxsize=None)
def cpu_scaled_mm_works() -> bool:
    """Whether `torch._scaled_mm` runs on this CPU: oneDNN implements FP8 matmuls only for
    some instruction sets (AVX512 with FP16/AMX; it raises "could not create a primitive
    descriptor" on an AVX2-only CPU or under ``ONEDNN_MAX_CPU_ISA=AVX2``).  Where it does not,
    :func:`fp8_gemm` multiplies the same FP8 operands with a float32 matmul instead."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def fp8_gemm(a: torch.Tensor, b_t: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
             out_dtype: torch.dtype, *, pad: bool | None = None, emulate: bool = False,
             fast_accum: bool = False) -> torch.Tensor:
    """(a @ b_t.T) * inv_a * inv_b on FP8 operands, in ``out_dtype``.

    ``a`` is (M, K) and ``b_t`` is (N, K), both FP8. `torch._scaled_mm` wants its first
    operand row-major and its second column-major, and on CUDA every dimension a multiple
    of 16: operands are zero-padded to that (``pad``: default on CUDA only; zeros add
    nothing to a dot product) and the result sliced back. ``emulate`` computes the same
    product with a float32 matmul (for GPUs without FP8 tensor cores). ``fast_accum``:
    `_scaled_mm`'s ``use_fast_accum`` (Hopper's faster, less precise accumulation; what
    torchao and Transformer Engine use for the forward GEMM; no effect on CPU).
    """
    m, n = a.shape[0], b_t.shape[0]
    if not emulate and not a.is_cuda and not cpu_scaled_mm_works():
        emulate = True  # oneDNN has no FP8 matmul for this CPU (or ONEDNN_MAX_CPU_ISA caps it)
    if emulate:
        # float32 GEMM of the exact FP8 values, outside any autocast (whose matmul rule would
        # round the product to the compute dtype before it is scaled: a second rounding)
        with torch.autocast(a.device.type, enabled=False):
            out = (a.to(torch.float32) @ b_t.to(torch.float32).t()) * (inv_a * inv_b)
        return out.to(out_dtype)
    if pad is None:
        pad = a.is_cuda
    if pad:
        k = _round16(a.shape[1])
        a, b_t = _pad_to(a, _round16(m), k), _pad_to(b_t, _round16(n), k)
    out = torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), scale_a=inv_a, scale_b=inv_b,
                           out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out[:m, :n] if pad else out


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w.T from FP8 operands quantized by the caller; the backward records the call's
    amaxes under delayed scaling (input, weight: computed by the forward; the output
    gradient), quantizes the output gradient and runs both gradient GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x2d, weight, xq, x_inv, wq, w_inv, amaxes, scale_bits, history_bits, step_bits, flags,
                layer):
        ctx.save_for_backward(xq, x_inv, wq, w_inv, amaxes)
        # The state is not a saved tensor: other calls of the layer write it before this
        # call's backward runs (a reused layer), which saved tensors' version check forbids.
        ctx.state = (scale_bits, history_bits, step_bits, flags)
        ctx.layer = layer
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        return fp8_gemm(xq, wq, x_inv, w_inv, layer.out_dtype, pad=layer.pad, emulate=layer.emulate,
                        fast_accum=layer.fast_accum)

    @staticmethod
    def backward(ctx, grad):
        xq, x_inv, wq, w_inv, amaxes = ctx.saved_tensors
        state, layer = ctx.state, ctx.layer
        fmt = role_format("grad_output", layer.recipe)
        if layer.recipe.scaling == "current":
            g_scale = _current_scale(grad, fmt)
        else:
            g_scale = state[2 if layer.record else 0][_GRAD].view(torch.float32).clone()
            if layer.record:
                _record(state, _INPUT, amaxes[0], layer.recipe, role_format("input", layer.recipe))
                _record(state, _WEIGHT, amaxes[1], layer.recipe, role_format("weight", layer.recipe))
                _record(state, _GRAD, _amax(grad), layer.recipe, fmt)
                state[3][_STALE].fill_(1)  # the next training forward begins the next step
        gq, g_inv = _quantize(grad, g_scale, fmt), _div(1.0, g_scale)
        opts = dict(pad=layer.pad, emulate=layer.emulate)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = fp8_gemm(gq, wq.t(), g_inv, w_inv, ctx.x_dtype, **opts)
        if ctx.needs_input_grad[1]:
            dw = fp8_gemm(gq.t(), xq.t(), g_inv, x_inv, ctx.w_dtype, **opts)
        return dx, dw, None, None, None, None, None, None, None, None, None, None


class _CallInfo:
    """What one call of an FP8Linear hands its backward (static data only)."""

    __slots__ = ("recipe", "out_dtype", "pad", "emulate", "record", "fast_accum")

    def __init__(self, recipe, out_dtype, pad, emulate, record, fast_accum):
        self.recipe, self.out_dtype, self.pad, self.emulate, self.record = recipe, out_dtype, pad, emulate, record
        self.fast_accum = fast_accum


# --------------------------------------------------------------------------- the layer

#: a Module's own containers: the new layer gets copies (same entries, its own dicts)
_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def new_layer_from(cls, linear: nn.Linear) -> nn.Linear:
    """An instance of ``cls`` (an ``nn.Linear`` subclass) that stands in for ``linear``,
    which is left unchanged (its class, its ``__dict__``).

    The new layer holds the same Parameter objects (so optimizers built before, FSDP2's
    sharding and state_dict keys see the same tensors), copies of the Parameter / buffer /
    child dictionaries (same entries, in the same order), and every other instance attribute
    by reference (``training``, sizes, attributes set by the user).  Hooks: when ``linear``
    has none, the new layer gets empty registries of its own (nothing registered on it later
    reaches ``linear``).  When the user registered some (forward, backward, state_dict
    hooks), the new layer's registries are ``linear``'s dictionaries themselves, so those
    hooks run on the new layer and the handles their registration returned still remove
    them; ``linear`` then shares the registries and would run hooks registered on the new
    layer too, should the caller keep and call it.

    Refused (one-line TypeError): anything but a plain ``nn.Linear`` (subclasses such as
    bitsandbytes' or FSDP2's sharded Linears have their own forward), a layer whose
    ``forward`` is replaced on the instance (a wrapper such as accelerate's hooks, which would
    bypass the FP8 forward) and a layer compiled in place with ``module.compile()`` (its
    compiled call runs the old layer's forward).
    """
    name = cls.__name__
    if type(linear) is not nn.Linear:
        raise TypeError(f"{name}.from_linear takes a plain nn.Linear, got {type(linear).__name__}")
    state = vars(linear)
    if "forward" in state:
        raise TypeError(f"{name}.from_linear: this nn.Linear has its forward replaced on the instance (a wrapper), "
                        f"which would bypass the {name} forward; convert before wrapping the layer")
    if state.get("_compiled_call_impl") is not None:
        raise TypeError(f"{name}.from_linear: this nn.Linear was compiled in place (module.compile()), which would "
                        "keep running the plain Linear; convert first, then compile")
    registries = [k for k, v in state.items() if "hooks" in k and isinstance(v, dict)]
    hooked = any(state[k] for k in registries)  # no hook registered: no handle to keep working
    new = cls.__new__(cls)
    fresh = {k: (v.copy() if k in _CONTAINERS or (k in registries and not hooked) else v)
             for k, v in state.items()}
    new.__dict__.update(fresh)
    return new


def swap_layers(model: nn.Module, swaps: dict[int, tuple[nn.Module, nn.Module]]) -> nn.Module:
    """Put each new layer where its old one was: ``swaps`` maps ``id(old)`` to ``(old, new)``;
    every parent holding ``old`` (a layer registered at several paths: each of them) gets
    ``new`` under the same name (``setattr``, so ``named_modules`` keeps its order).  Returns
    the model, or the new layer when ``model`` is itself a swapped layer."""
    root = swaps[id(model)][1] if id(model) in swaps else model
    seen = {id(root)}
    todo = [root]
    while todo:
        parent = todo.pop()
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) in swaps and swaps[id(child)][0] is child:
                child = swaps[id(child)][1]
                setattr(parent, child_name, child)
            if id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return root


class FP8Linear(nn.Linear):
    """`nn.Linear` whose GEMMs run in FP8 (see the module docstring).

    ``recipe``: a `dualprec.FP8Recipe` (default: delayed scaling, HYBRID, history 1024,
    max, margin 0). ``emulate``: float32 GEMMs on the FP8 operands instead of
    `torch._scaled_mm` (same quantization, for GPUs without FP8 tensor cores). ``pad``:
    zero-pad GEMM operands to multiples of 16 (None: on CUDA, where `_scaled_mm` needs it).
    ``out_dtype``: the output dtype (None: the autocast dtype inside an autocast, else the
    input's). ``fast_accum``: the forward GEMM accumulates with Hopper's fast (less
    precise) mode, as torchao and Transformer Engine do; the gradient GEMMs never do.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: FP8Recipe | None = None, emulate: bool = False, pad: bool | None = None,
                 out_dtype: torch.dtype | None = None, fast_accum: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fp8(recipe, emulate, pad, out_dtype, fast_accum)

    @classmethod
    def convert(cls, *args, **kwargs):
        """Removed: it changed the Linear in place. Raises, naming `from_linear`."""
        raise TypeError(f"{cls.__name__}.convert(linear) changed the layer in place and is gone: "
                        f"layer = {cls.__name__}.from_linear(linear, ...) returns a new layer around the same "
                        "Parameters (put it where the Linear was), or use "
                        "dualprec_torch.fp8.convert_module(model, policy)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe | None = None, *, emulate: bool = False,
                    pad: bool | None = None) -> "FP8Linear":
        """A new FP8Linear built around ``linear``'s Parameters (the same objects), returned;
        ``linear`` itself is left as it is.  The caller puts the new layer where ``linear``
        was (`convert_module` does, in every parent that holds it).  See `new_layer_from` for
        what the new layer takes over (hooks, buffers, attributes)."""
        new = new_layer_from(cls, linear)
        new._init_fp8(recipe, emulate, pad)
        return new

    def _init_fp8(self, recipe, emulate, pad, out_dtype=None, fast_accum=False) -> None:
        recipe = FP8Recipe() if recipe is None else recipe
        if not isinstance(recipe, FP8Recipe):
            raise TypeError(f"recipe must be a dualprec FP8Recipe, got {type(recipe).__name__}")
        if recipe.block_scaled:
            raise UnsupportedPolicyError(f"fp8={recipe.scaling}: FP8Linear runs per-tensor scaling (delayed, "
                                         "current); block-scaled recipes run in "
                                         "dualprec_torch.blockscale.BlockScaledLinear (convert_module picks it)")
        self.recipe, self.emulate, self.pad, self.out_dtype = recipe, bool(emulate), pad, out_dtype
        self.fast_accum = bool(fast_accum)
        device = self.weight.device
        if recipe.scaling == "delayed":
            ones = torch.ones(len(ROLES), dtype=torch.float32, device=device)
            zeros = torch.zeros(len(ROLES), recipe.history_len, dtype=torch.float32, device=device)
            self.register_buffer("fp8_scale_bits", ones.view(torch.int32).clone())
            self.register_buffer("fp8_amax_history_bits", zeros.view(torch.int32).clone())
            # the current step (not saved: a step ends with its backward, before a checkpoint):
            # its scales, and per role whether it recorded, plus the "next forward begins a step" flag
            self.register_buffer("fp8_step_scale_bits", ones.view(torch.int32).clone(), persistent=False)
            flags = torch.zeros(len(ROLES) + 1, dtype=torch.int32, device=device)
            flags[_STALE] = 1
            self.register_buffer("fp8_step_flags", flags, persistent=False)
        else:
            self.fp8_scale_bits = self.fp8_amax_history_bits = None
            self.fp8_step_scale_bits = self.fp8_step_flags = None
        if device.type == "cuda":
            check_device(device, emulate=self.emulate)

    def _end_step(self) -> None:
        """Close the current step: the next training forward begins one on the stored scales."""
        if self.fp8_step_flags is not None:
            with torch.no_grad():
                self.fp8_step_flags[_STALE] = 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._end_step()  # loaded scales: the next step starts from them

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.weight.device.type == "cuda":
            check_device(self.weight.device, emulate=self.emulate)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, k)
        if self.out_dtype is not None:
            out_dtype = self.out_dtype
        elif torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            out_dtype = x.dtype if x.is_floating_point() else torch.float32
        fmt = role_format("input", self.recipe)  # the forward roles share E4M3
        if self.recipe.scaling == "current":
            x_scale, w_scale = _current_scale(x2d, fmt), _current_scale(self.weight, fmt)
            state, amaxes, record = (x_scale,) * 4, x_scale, False  # placeholders keep apply's arity
        else:
            # One recipe step per training step: the calls of the layer up to its backward
            # (a reused layer: several) quantize with the step's scales; each call's amaxes
            # are recorded by its backward, combined with max within the step.
            state = (self.fp8_scale_bits, self.fp8_amax_history_bits, self.fp8_step_scale_bits,
                     self.fp8_step_flags)
            if self.training and not _in_backward():
                _begin_step(state)
            bits = (state[2] if self.training else state[0]).view(torch.float32)
            x_scale, w_scale = bits[_INPUT].clone(), bits[_WEIGHT].clone()
            record = self.training and torch.is_grad_enabled()
            amaxes = torch.stack([_amax(x2d), _amax(self.weight)]) if record else x_scale
            if record and not (x2d.requires_grad or self.weight.requires_grad):
                # no backward will run (nothing to differentiate): record here, one step per call
                _record(state, _INPUT, amaxes[0], self.recipe, fmt)
                _record(state, _WEIGHT, amaxes[1], self.recipe, fmt)
                state[3][_STALE].fill_(1)
                record = False
        # The GEMM's float32 result, the bias added in float32, one rounding to the output dtype:
        # the op policy's matmul rule, and the JAX engine's (a bias added after rounding the
        # product to bfloat16 would round twice).
        info = _CallInfo(self.recipe, torch.float32, self.pad, self.emulate, record, self.fast_accum)
        xq, wq = _quantize(x2d, x_scale, fmt), _quantize(self.weight, w_scale, fmt)
        y = _FP8Matmul.apply(x2d, self.weight, xq, _div(1.0, x_scale), wq, _div(1.0, w_scale), amaxes,
                             *state, info)
        if self.bias is not None:  # the bias in the compute dtype (the op policy's), added in float32
            y = y + self.bias.to(out_dtype).to(torch.float32)
        return y.to(out_dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        r = self.recipe
        recipe = (f"delayed(history_len={r.history_len}, margin={r.margin}, amax_algo={r.amax_algo})"
                  if r.scaling == "delayed" else "current")
        return f"{super().extra_repr()}, fp8={recipe}, format={r.format}" + (", emulate" if self.emulate else "")


# --------------------------------------------------------------------------- device and engine

def check_device(device, *, emulate: bool = False) -> None:
    """FP8 GEMMs on a CUDA device need compute capability >= 8.9; a clear error otherwise."""
    device = torch.device(device)
    if device.type != "cuda" or emulate:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    cc = tuple(torch.cuda.get_device_capability(index))
    if cc < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise UnsupportedPolicyError(
            f"FP8 GEMMs need compute capability >= 8.9 (Ada) or 9.0 (Hopper); {name} has "
            f"{cc[0]}.{cc[1]}. Drop fp8=... from the policy (bf16-mixed), or convert with "
            "emulate=True for the FP8 numerics through float32 GEMMs (no speed-up)")


def _cuda_capability():
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(torch.cuda.current_device()))


def select_engine(recipe: FP8Recipe) -> str:
    """"native" or "transformer-engine" for ``recipe.engine``.

    auto: Transformer Engine when it imports, has the recipe's class and runs it on the
    current GPU (compute capability >= 8.9 for per-tensor FP8, >= 10.0 for MXFP8 and NVFP4),
    and the recipe has no option TE lacks (row-wise, an MX rounding other than rceil); the
    native engine otherwise. "transformer-engine" fails clearly when TE does not import or
    cannot carry out the recipe as the policy defines it (`dualprec.te_recipes`).
    """
    from dualprec.te_recipes import te_runs_on

    from . import te

    if recipe.engine == "native":
        return "native"
    if recipe.engine == "transformer-engine":
        te.te_recipe(recipe)  # raises with the install hint, or naming the option TE lacks
        return "transformer-engine"
    if te_runs_on(recipe, _cuda_capability()) and te.supports(recipe):
        return "transformer-engine"
    return "native"


# --------------------------------------------------------------------------- conversion

def fp8_layers(model: nn.Module, policy, module_filter_fn=None, types=(nn.Linear,)):
    """(path, module, recipe) for each module of exactly one of ``types`` whose policy
    (``policy.for_module(path)``) has an FP8 recipe, and that ``module_filter_fn(module,
    path)`` (torchao's filter signature) accepts. Subclasses (bitsandbytes' quantized
    Linears among them) are not selected: their forward is not a plain GEMM."""
    for path, module in model.named_modules():
        if type(module) not in types:
            continue
        recipe = policy.for_module(path).fp8
        if recipe is None:
            continue
        if module_filter_fn is not None and not module_filter_fn(module, path):
            continue
        yield path, module, recipe


def _first_recipe(policy) -> FP8Recipe | None:
    """The recipe that picks the engine: the top-level one, else the first override's."""
    recipes = [sub.fp8 for sub in [policy] + [s for _, s in policy.overrides] if sub.fp8 is not None]
    return recipes[0] if recipes else None


@contextlib.contextmanager
def init_context(policy, inner=None):
    """``inner`` (a context, e.g. the policy's dtype context), plus Transformer Engine's
    ``quantized_model_init`` when the policy's FP8 engine resolves to TE: TE modules
    created inside keep FP8 weights only. A no-op addition under the native engine."""
    recipe = _first_recipe(policy)
    with contextlib.ExitStack() as stack:
        if inner is not None:
            stack.enter_context(inner)
        if recipe is not None and select_engine(recipe) == "transformer-engine":
            from . import te

            stack.enter_context(te.init_context(recipe))
        yield


def convert_module(model: nn.Module, policy, *, engine: str | None = None, emulate: bool = False,
                   module_filter_fn=None) -> nn.Module:
    """Apply the policy's FP8 recipes to ``model`` and return it: each selected ``nn.Linear``
    is replaced in its parent by a new FP8Linear / BlockScaledLinear around the same
    Parameters (`swap_layers`); a bare ``nn.Linear`` passed as the model comes back as the
    new layer, so use the return value.

    ``engine``: overrides the recipe's ("auto" | "native" | "transformer-engine").
    ``emulate``: native engine only, float32 GEMMs on FP8 operands (for pre-Ada GPUs).
    """
    top = _first_recipe(policy)
    if top is None:
        return model
    if engine is not None:
        top = dataclasses.replace(top, engine=engine)
    if select_engine(top) == "transformer-engine":
        from . import te

        return te.convert_module(model, policy, module_filter_fn=module_filter_fn)
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        check_device(device, emulate=emulate)
    from .blockscale import BlockScaledLinear, layer_seed

    swaps = {}  # id(old Linear) -> (old Linear, its new layer)
    for path, module, recipe in list(fp8_layers(model, policy, module_filter_fn)):
        if recipe.block_scaled:  # row-wise / MXFP8 / NVFP4: emulated layers (docs/block-scaling.md)
            new = BlockScaledLinear.from_linear(module, recipe, layer_seed(path))
        else:
            new = FP8Linear.from_linear(module, recipe, emulate=emulate)
        swaps[id(module)] = (module, new)
    model = swap_layers(model, swaps)

    others = [path for path, m in model.named_modules()
              if isinstance(m, nn.Linear) and not isinstance(m, (FP8Linear, BlockScaledLinear))
              and type(m) is not nn.Linear
              and policy.for_module(path).fp8 is not None]
    if others:
        warnings.warn(f"FP8 leaves {len(others)} Linear subclass(es) as they are ({', '.join(others[:4])}): "
                      "quantized or custom layers do not run their GEMMs through FP8Linear", stacklevel=2)
    if not any(isinstance(m, (FP8Linear, BlockScaledLinear)) for m in model.modules()):
        warnings.warn(f'policy "{policy}" asks for FP8 but the model has no nn.Linear under an FP8 '
                      "recipe; nothing was converted", stacklevel=2)
    return model


# --------------------------------------------------------------------------- state

def _fp8_modules(model: nn.Module):
    """(name prefix, layer) for each delayed-scaling FP8Linear ("fp8.fc1", "fp8" for the root)."""
    for path, module in model.named_modules():
        if isinstance(module, FP8Linear) and module.fp8_scale_bits is not None:
            yield (f"fp8.{path}" if path else "fp8"), module


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The delayed-scaling state as float32 tensors named
    ``fp8.<layer path>.<input|weight|grad_output>.<scale|amax_history>`` (copies, on CPU)."""
    out = {}
    for prefix, module in _fp8_modules(model):
        scales = module.fp8_scale_bits.detach().cpu().view(torch.float32)
        histories = module.fp8_amax_history_bits.detach().cpu().view(torch.float32)
        for i, role in enumerate(ROLES):
            out[f"{prefix}.{role}.scale"] = scales[i].clone()
            out[f"{prefix}.{role}.amax_history"] = histories[i].clone()
    for prefix, module in _block_modules(model):
        out[f"{prefix}.blockscale.state"] = module.blockscale_state.detach().cpu().clone()
    return out


def _block_modules(model: nn.Module):
    """(name prefix, layer) for each block-scaled layer (state: int64 [seed, step])."""
    from .blockscale import BlockScaledLinear

    for path, module in model.named_modules():
        if isinstance(module, BlockScaledLinear):
            yield (f"fp8.{path}" if path else "fp8"), module


def _float32(value) -> torch.Tensor:
    """A CPU float32 tensor from a torch tensor (any device) or anything NumPy takes."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).contiguous()
    import numpy as np

    return torch.from_numpy(np.array(value, dtype=np.float32))


def load_state_tensors(model: nn.Module, tensors, *, strict: bool = True) -> None:
    """Restore `state_tensors` output (torch tensors or numpy arrays, any float32 source).

    Every ``fp8.*`` name must belong to an FP8 layer of ``model`` and every FP8 layer must
    find its state: FP8 state for a model without FP8 layers, or a model with FP8 layers
    and no state for them, is a `PolicyError` (never a silent run on fresh or stale scales).
    ``strict=False`` takes what matches and leaves the other layers at their initial state.
    """
    given = {k: v for k, v in tensors.items() if k.startswith("fp8.")}
    expected = state_tensors(model)
    unknown = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    if strict and (unknown or missing):
        if not expected:
            why = "this model has no FP8 (delayed-scaling) layers: the checkpoint was written by an FP8 run"
        elif not given:
            why = "the checkpoint has no FP8 state: it was written by a run without FP8 (or current scaling)"
        else:
            why = f"unknown names {unknown[:4]}, missing names {missing[:4]}"
        raise PolicyError(f"load_state_tensors: {why}. Resume under the policy that wrote the checkpoint; "
                          "to take only the matching layers (the others start from fresh scales) call "
                          "dualprec_torch.fp8.load_state_tensors(model, tensors, strict=False), or drop "
                          "state['extensions']['fp8'] from a Precision state dict to ignore it")
    for prefix, module in _block_modules(model):
        key = f"{prefix}.blockscale.state"
        if key in given:
            value = given[key]
            value = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(
                __import__("numpy").asarray(value))
            with torch.no_grad():
                module.blockscale_state.copy_(value.reshape(2).to(torch.int64))
    for prefix, module in _fp8_modules(model):
        for i, role in enumerate(ROLES):
            key = f"{prefix}.{role}"
            if f"{key}.scale" not in given:
                continue
            scale = _float32(given[f"{key}.scale"]).reshape(())
            history = _float32(given[f"{key}.amax_history"])
            if history.shape != module.fp8_amax_history_bits[i].shape:
                raise PolicyError(f"load_state_tensors: {key}.amax_history has {tuple(history.shape)[0]} "
                                  f"entries, this layer's recipe keeps {module.recipe.history_len}")
            device = module.fp8_scale_bits.device
            with torch.no_grad():
                module.fp8_scale_bits[i].copy_(scale.view(torch.int32).to(device))
                module.fp8_amax_history_bits[i].copy_(history.contiguous().view(torch.int32).to(device))
        module._end_step()
