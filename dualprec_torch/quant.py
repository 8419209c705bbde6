"""Weight quantization of a torch model's linear layers with bitsandbytes, as a Policy says.

`quantize_module(model, policy)` replaces every ``nn.Linear`` whose path the policy quantizes
(``policy.quantizes(path)``) by a bitsandbytes ``Linear4bit`` (nf4, fp4, with ``-dq`` double
quantization) or ``Linear8bitLt`` (int8, int8-training) and quantizes its weight right away,
on ``device`` or where the weight is.  The layers are bitsandbytes' own classes, subclassed
in `dualprec_torch.quant_layers` (``QuantLinear4bit``, ``QuantLinear8bit``; this module names
them too and imports bitsandbytes on first use), so their state dicts use bitsandbytes' key
layout and a plain bitsandbytes model loads them.

What the subclasses add to bitsandbytes 0.50:

- ``load_state_dict`` reads back what ``state_dict`` writes: a full-precision weight is
  quantized; a quantized one (``weight`` + ``weight.absmax``, ``weight.quant_map``,
  ``weight.nested_*``, ``weight.quant_state.bitsandbytes__<type>``; ``weight`` + ``SCB`` for
  int8) replaces the layer's state, with ``strict=True``.  bitsandbytes' ``Linear4bit``
  writes those keys but does not read them (strict loading fails, non-strict loading keeps
  the old absmax under the new codes) and ``Linear8bitLt`` drops ``SCB`` under
  ``strict=False``.  A checkpoint quantized differently (type, block size, double
  quantization) or with other shapes is an error naming the key and both sides.
- The forward neither rewrites the weight nor casts the bias in place (bitsandbytes does
  both: its CPU inference path repacks the weight for AVX512-BF16 kernels, and it casts the
  bias parameter to the compute dtype), so the quantized bytes stay bitsandbytes' layout on
  every device.  On the CPU it is dequantize (straight to the compute dtype, as
  bitsandbytes' ``matmul_4bit``) then ``F.linear``, exact for every shape
  (bitsandbytes' fused CPU dequantize, which its CPU matmuls use, is wrong on AVX512 when a
  row holds a multiple of 16 values but not of the block size); on a GPU it is
  bitsandbytes' ``matmul_4bit``.
- Device moves keep the quantized state: the codes move, the quantization state follows the
  weight, nothing is quantized again.

Everything bitsandbytes-specific is imported lazily: without it, quantizing raises an
ImportError naming ``pip install "dualprec[bnb]"``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import weakref

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as module_mod

from dualprec.errors import QuantizationError, UnsupportedPolicyError

from .casts import torch_dtype

__all__ = [
    "quantize_module", "quantized_layers", "is_quantized", "rebind_optimizer",
    "module_init_context",
    "state_tensors", "load_state_tensors", "deferred_init", "require_bitsandbytes",
    "QuantizationError", "save_bnb", "load_bnb",
]

INSTALL_HINT = 'pip install "dualprec[bnb]"'
_SKIP_INIT = "_dualprec_skip_init"


@functools.lru_cache(maxsize=1)
def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # ModuleNotFoundError, or a broken native library
        raise ImportError(f"quantization needs bitsandbytes, which could not be imported ({e}); "
                          f"install it with {INSTALL_HINT}") from e
    return bitsandbytes


def require_bitsandbytes():
    """The bitsandbytes module, or an ImportError that says how to install it."""
    return _bnb()


# ----- the layer classes (dualprec_torch.quant_layers, which imports bitsandbytes) ----------


def _classes():
    _bnb()  # the install hint, if bitsandbytes is missing
    from .quant_layers import QuantLinear4bit, QuantLinear8bit

    return QuantLinear4bit, QuantLinear8bit


def __getattr__(name):
    """``QuantLinear4bit`` and ``QuantLinear8bit`` import bitsandbytes on first use."""
    if name == "QuantLinear4bit":
        return _classes()[0]
    if name == "QuantLinear8bit":
        return _classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----- quantizing a model -----------------------------------------------------------------


def _bnb_linear_types():
    bnb = _bnb()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) for every bitsandbytes linear layer in ``model``.  Without bitsandbytes
    imported no such layer can exist: the answer is [] without importing it (seconds, and a
    warning on CPU), so unquantized runs never pay for it."""
    if "bitsandbytes" not in sys.modules:
        return []
    types = _bnb_linear_types()
    return [(path, m) for path, m in model.named_modules() if isinstance(m, types)]


def is_quantized(model: nn.Module) -> bool:
    if "bitsandbytes" not in sys.modules:
        return False
    try:
        types = _bnb_linear_types()
    except ImportError:
        return False
    return any(isinstance(m, types) for m in model.modules())


def _check_blocksize(q, device: torch.device) -> None:
    if q.is_4bit and device.type == "cuda" and torch.version.hip and q.blocksize < 64:
        raise UnsupportedPolicyError(f"quant={q.mode}(blocksize={q.blocksize}): bitsandbytes' ROCm kernels "
                                     "start at blocksize 64; use blocksize=64 or larger")


def _replacement(path: str, linear: nn.Linear, policy, device) -> nn.Module:
    sub = policy.for_module(path)
    q = sub.quantization
    target = torch.device(device) if device is not None else (
        linear.weight.device if linear.weight.device.type != "meta" else _deferred_device(linear))
    _check_blocksize(q, target)
    Q4, Q8 = _classes()
    cls = Q4 if q.is_4bit else Q8
    layer = cls.empty(linear.in_features, linear.out_features, linear.bias is not None, q,
                      torch_dtype(sub.compute_dtype), torch_dtype(sub.param_dtype), target)
    layer.train(linear.training)
    if linear.bias is not None:
        bias = linear.bias
        if bias.device.type == "meta":
            bias = nn.Parameter(torch.empty_like(bias, device=target), requires_grad=bias.requires_grad)
            if not getattr(linear, _SKIP_INIT, False):
                _init_bias(bias, linear.in_features)
        elif bias.device != target:
            bias.data = bias.data.to(target)
        layer.bias = bias  # the same Parameter: optimizers built on the model keep it
    if linear.weight.device.type == "meta":
        # created under init_module(): materialise one layer at a time, then quantize
        if not getattr(linear, _SKIP_INIT, False):
            layer.quantize_(_init_weight(linear, target, layer.param_dtype))
    else:
        layer.quantize_(linear.weight)
    return layer


def _init_weight(linear: nn.Linear, device, dtype) -> torch.Tensor:
    w = torch.empty(linear.out_features, linear.in_features, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear.reset_parameters
    return w


def _init_bias(bias: torch.Tensor, fan_in: int) -> None:
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    with torch.no_grad():
        nn.init.uniform_(bias, -bound, bound)


def _loaded(t):
    """A tensor from a state dict, read in if it is a lazy one (Lightning's _lazy_load)."""
    if t is not None and not isinstance(t, torch.Tensor) and hasattr(t, "_load_tensor"):
        return t._load_tensor()
    return t


def _deferred_device(linear: nn.Linear) -> torch.device:
    return getattr(linear, "_dualprec_device", None) or torch.device("cpu")


def _materialise(linear: nn.Linear, device) -> None:
    """A skipped Linear created on the meta device: the full-precision layer, initialised."""
    target = torch.device(device) if device is not None else _deferred_device(linear)
    skip_init = getattr(linear, _SKIP_INIT, False)
    linear.to_empty(device=target)
    if not skip_init:
        linear.reset_parameters()


def quantize_module(model: nn.Module, policy, device=None) -> nn.Module:
    """Replace ``model``'s quantized ``nn.Linear`` layers by bitsandbytes layers, in place.

    ``policy``: a dualprec Policy (or anything ``Policy.parse`` takes); each Linear at a path
    ``policy.quantizes(path)`` accepts becomes a ``Linear4bit`` (nf4 / fp4, double
    quantization for ``-dq``, the policy's block size, compute dtype = the module's compute
    dtype, uint8 storage) or a ``Linear8bitLt`` (threshold from the policy, 6.0 by default;
    int8-training keeps trainable weights).  Weights are quantized from their value in the
    module's param dtype, on ``device`` (default: where each weight is).  Skipped layers stay
    ``nn.Linear``.  The biases stay the same Parameter objects.  Returns ``model``.
    """
    from dualprec import Policy

    policy = Policy.parse(policy)
    _bnb()
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_module(model, policy): model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise QuantizationError("quantize_module: the model itself is an nn.Linear; wrap it in a container "
                                "(nn.Sequential(layer)) so the quantized layer can replace it")
    done = quantized_layers(model)
    if done:
        path, layer = done[0]
        raise QuantizationError(
            f"the model is already quantized ({path or 'the model'}: {type(layer).__name__}); quantize a "
            "model once, from its full-precision nn.Linear layers (Precision.setup does it), or set up "
            "a fresh model")
    # exactly nn.Linear: subclasses may not call Linear.forward (MultiheadAttention reads its
    # out_proj's weight directly), so a quantized weight there would be read as raw bytes
    linears = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise QuantizationError(
            f'"{policy}" quantizes nn.Linear layers, but this {type(model).__name__} has none (nn.Linear '
            "subclasses such as MultiheadAttention's out_proj are left alone); drop quant=... from the policy")
    policy.check_skips_match((p for p, _ in model.named_modules()), "quantize_module")
    chosen = [(p, m) for p, m in linears if policy.quantizes(p)]
    _check_no_tied_weight(model, chosen, policy)
    for path, linear in linears:
        if not policy.quantizes(path) and linear.weight.device.type == "meta":
            _materialise(linear, device)
    for path, linear in chosen:
        layer = _replacement(path, linear, policy, device)
        layer._dualprec_source = weakref.ref(linear.weight)
        _set_submodule(model, path, layer)
    return model


def _check_no_tied_weight(model: nn.Module, chosen, policy) -> None:
    """A quantized Linear whose weight is shared with another module (a language model's
    head tied to its embedding) would break the tie: the other module keeps training a
    full-precision weight while the layer holds a frozen quantized copy."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for path, linear in chosen:
        others = [n for n in owners.get(id(linear.weight), []) if n != f"{path}.weight"]
        if others:
            mode = policy.for_module(path).quantization.mode
            raise QuantizationError(
                f'"{policy}" would quantize {path}, whose weight is tied to {", ".join(others)}: the tie would '
                f"break (the other module keeps training, {path} becomes a frozen quantized copy); keep it out "
                f"of quantization with quant={mode}(skip={path}), or untie the weights first")


def _set_submodule(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, layer)


def rebind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Point ``optimizer`` (built before quantization) at the quantized model's parameters.

    Weights that became frozen quantized codes leave the optimizer (so their full-precision
    copy is freed); int8-training's trainable weights replace their originals.
    """
    replaced = {}
    for _, layer in quantized_layers(model):
        ref = layer.__dict__.get("_dualprec_source")  # weak: it keeps nothing alive
        source = ref() if ref is not None else None
        if source is not None:
            replaced[id(source)] = (source, layer.weight if layer.weight.requires_grad else None)
    if not replaced:
        return
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in replaced or replaced[id(p)][0] is not p:
                params.append(p)
                continue
            if optimizer.state.get(p):
                raise QuantizationError("the optimizer has already stepped on weights that quantization replaces; "
                                        "set the model up (quantize it) before the first optimizer step")
            new = replaced[id(p)][1]
            if new is not None:
                params.append(new)
        group["params"] = params


# ----- creating a model under init_module --------------------------------------------------


@contextlib.contextmanager
def module_init_context(policy, device, device_type: str, empty_init: bool = False):
    """`Precision.init_module`'s context: the policy's dtype and device and, under a quantized
    policy on a GPU, `deferred_init` (on a CPU the layers are created in full precision and
    quantized at setup, unless ``empty_init``: uninitialised weights are never quantized, the
    layers wait on the meta device for the state dict that fills them)."""
    from .init import init_context

    with contextlib.ExitStack() as stack:
        stack.enter_context(init_context(policy, device, empty_init))
        if policy.uses_quantization and (device_type == "cuda" or empty_init):
            stack.enter_context(deferred_init(empty_init))
        yield


def _fill_meta_linear(module, state_dict, prefix, *args):
    """A state dict loaded into a deferred Linear before setup: its meta weight and bias take
    the loaded values (copying into a meta tensor would drop them), so setup quantizes them."""
    for name in ("weight", "bias"):
        param, key = getattr(module, name, None), prefix + name
        if param is not None and param.device.type == "meta" and key in state_dict:
            value = _loaded(state_dict[key]).detach().to(device=_deferred_device(module), dtype=param.dtype)
            setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))


@contextlib.contextmanager
def deferred_init(empty_init: bool = False):
    """Context: ``nn.Linear`` layers created inside keep their weight (and bias) on the meta
    device, so no full-precision copy of the model is ever held (each layer's weight exists
    for a moment, as torch.empty, before it is swapped out); `quantize_module` then creates
    and quantizes them one layer at a time on the device they were created on (skipped
    layers are materialised there in full precision).  Without ``empty_init`` they are
    initialised as ``nn.Linear.reset_parameters`` does, just before quantization (custom
    initialisers run inside the context act on meta tensors and are lost); with it, a
    checkpoint is expected to fill them (``load_state_dict`` quantizes full-precision
    weights as it loads).
    """

    def hook(module, name, param):
        if type(module) is nn.Linear and name in ("weight", "bias") and param is not None and param.device.type != "meta":
            module._dualprec_device = param.device
            setattr(module, _SKIP_INIT, empty_init)
            if not getattr(module, "_dualprec_load_hook", False):
                module._register_load_state_dict_pre_hook(_fill_meta_linear, with_module=True)
                module._dualprec_load_hook = True
            return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        return None

    handle = module_mod.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ----- state as flat arrays (checkpoints) --------------------------------------------------


def state_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """Every quantized layer's state under bitsandbytes' key names, prefixed by its path
    (``fc1.weight``, ``fc1.weight.absmax``, ``fc1.weight.quant_state.bitsandbytes__nf4``,
    ``fc1.bias``, ``fc2.SCB`` ...), as NumPy arrays (bfloat16 via ml_dtypes)."""
    out = {}
    for path, layer in quantized_layers(model):
        prefix = f"{path}." if path else ""
        for k, v in layer.state_dict().items():
            out[prefix + k] = _to_numpy(v)
    return out


def load_state_tensors(model: nn.Module, tensors: dict) -> None:
    """Load `state_tensors` output (NumPy or torch values) into ``model``'s quantized layers.
    Every quantized layer must find its keys (strict); keys of no quantized layer are an error."""
    layers = quantized_layers(model)
    used = set()
    for path, layer in layers:
        prefix = f"{path}." if path else ""
        sub = {k[len(prefix):]: to_torch(v) for k, v in tensors.items()
               if k.startswith(prefix) and not any(k.startswith(f"{p}.") for p, _ in layers if len(p) > len(path) and p.startswith(prefix))}
        used.update(prefix + k for k in sub)
        layer.load_state_dict(sub, strict=True)
    extra = sorted(set(tensors) - used)
    if extra:
        raise QuantizationError(f"load_state_tensors: {len(extra)} key(s) belong to no quantized layer: "
                                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a) -> torch.Tensor:
    """A torch tensor of a state value (NumPy, bfloat16 via ml_dtypes, or already a tensor)."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


# ----- bitsandbytes-layout files --------------------------------------------------------------


def save_bnb(path, model: nn.Module) -> None:
    """``model.state_dict()`` (bitsandbytes' layout for the quantized layers) written with
    safetensors, atomically and with dualprec's checksum over the whole file; a plain
    bitsandbytes model and `dualprec_jax.quant.load_bnb` read it."""
    from dualprec.checkpoint import write_checked

    write_checked(path, {k: v.detach().contiguous() for k, v in model.state_dict().items()}, framework="torch")


def load_bnb(path, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a bitsandbytes-layout safetensors file (`save_bnb`'s, JAX's `save_bnb`'s, or
    one torch wrote) into ``model`` (set up by `Precision.setup`); a file dualprec wrote is
    checked against its checksum (CheckpointError when damaged)."""
    from dualprec.checkpoint import read_checked

    _, tensors, _ = read_checked(path, require=False, framework="torch")
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        raise QuantizationError(f"load_bnb: {path} does not fit this model: {str(e).splitlines()[0]}") from None
    return model
