"""bitsandbytes' linear layers as the Policy runs them: `QuantLinear4bit` (nf4, fp4, with
``-dq`` double quantization) and `QuantLinear8bit` (int8, int8-training), subclasses of
``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` that load what they save, keep their state
across device moves, and never rewrite their weight in the forward (see
`dualprec_torch.quant`).  Importing this module imports bitsandbytes;
``dualprec_torch.quant.QuantLinear4bit`` / ``QuantLinear8bit`` name the same classes and
import it on first use, with an install hint if it is missing.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes import functional as F
from torch import nn

from dualprec.errors import QuantizationError

__all__ = ["QuantLinear4bit", "QuantLinear8bit"]


def _device_of(layer: nn.Module) -> torch.device:
    w = layer.weight
    if w.device.type == "meta" and getattr(layer, "_dualprec_device", None) is not None:
        return layer._dualprec_device
    return w.device


def _full_weight(layer, tensor: torch.Tensor, key: str) -> torch.Tensor:
    shape = (layer.out_features, layer.in_features)
    if tuple(tensor.shape) != shape:
        raise QuantizationError(
            f"size mismatch for {key}: the checkpoint has a {_dtype_str(tensor)} tensor of shape "
            f"{tuple(tensor.shape)}, this model's layer has shape {shape} ({layer.quant_mode})")
    return tensor


def _dtype_str(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _apply_empty(layer, fn) -> bool:
    """A layer still waiting for its weight (deferred, empty_init): a move or cast records the
    target device for the weight to come and applies to the bias.  Returns whether it did."""
    if layer.weight.device.type != "meta":
        return False
    layer._dualprec_device = fn(torch.empty(0, device=_device_of(layer))).device
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.data = fn(layer.bias)
    return True


def _loaded(t):
    """A tensor from a state dict, read in if it is a lazy one (Lightning's _lazy_load, which
    LitGPT's loaders use, hands out tensors that are read on first use)."""
    if t is not None and not isinstance(t, torch.Tensor) and hasattr(t, "_load_tensor"):
        return t._load_tensor()
    return t


def _base_load(layer, state_dict, prefix, own: set, *args):
    """nn.Module's loading for everything but ``own`` keys (the bias), not bitsandbytes'."""
    local_metadata, strict, missing, unexpected, errors = args
    rest = {k: v for k, v in state_dict.items() if k not in own}
    nn.Module._load_from_state_dict(layer, rest, prefix, local_metadata, strict, missing, unexpected, errors)
    key = prefix + "weight"
    if key in state_dict and key in missing:
        missing.remove(key)


class QuantLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit with loading, device moves and a forward that keep its state."""

    @classmethod
    def empty(cls, in_features, out_features, bias, q, compute_dtype, param_dtype, device):
        layer = cls(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                    compress_statistics=q.double_quant, quant_type=q.quant_type,
                    quant_storage=torch.uint8, device="meta")
        layer.weight.blocksize = q.blocksize
        layer.support_avx512bf16_for_cpu = False  # the in-place repacking path, see the module doc
        layer.quant_mode, layer.blocksize = q.mode, q.blocksize
        layer.param_dtype = param_dtype
        layer._dualprec_device = torch.device(device)
        return layer

    def quantize_(self, weight: torch.Tensor, device=None) -> None:
        """Quantize the full-precision ``weight`` (out, in) into this layer, on ``device``."""
        device = torch.device(device) if device is not None else _device_of(self)
        w = weight.detach().to(device=device, dtype=self.param_dtype).contiguous()
        if w.is_floating_point() and not torch.isfinite(w).all():
            raise QuantizationError("the weight holds NaN or inf, which would poison its whole "
                                    "quantization block; fix the weights before quantizing")
        packed, state = F.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.weight.compress_statistics,
                                        quant_type=self.weight.quant_type, quant_storage=torch.uint8)
        self._set_state(packed, state)

    def _set_state(self, packed, state) -> None:
        self.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=self.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type,
            quant_storage=packed.dtype, module=self, bnb_quantized=True)
        self.quant_state = state

    @property
    def quantized(self) -> bool:
        return getattr(self.weight, "quant_state", None) is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in ``dtype`` (default: the quantization state's dtype, what
        bitsandbytes' ``dequantize_4bit`` returns), rounded once from float32."""
        state = self.weight.quant_state
        dtype = dtype or state.dtype
        rows, cols = state.shape
        if self.weight.device.type == "cpu" and cols % 16 == 0 and cols % state.blocksize:
            # bitsandbytes' fused CPU kernel is wrong for rows that are a multiple of 16 values
            # but not of the block size; as one flat row the same codes take its exact path.
            shape = torch.Size([rows * cols])
        else:
            shape = state.shape  # rows split across threads
        view = F.QuantState(absmax=state.absmax, shape=shape, code=state.code, blocksize=state.blocksize,
                            quant_type=state.quant_type, dtype=dtype, offset=state.offset, state2=state.state2)
        return F.dequantize_4bit(self.weight.data, view).reshape(state.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            raise QuantizationError("this Linear4bit has no quantized weight yet (created under "
                                    "init_module and not set up): call precision.setup(model) or "
                                    "load a state dict first")
        out_dtype = self.compute_dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if x.device.type == "cpu":  # bitsandbytes' CPU matmuls share its dequantize bug (see dequantize)
            # Straight to the compute dtype, as bitsandbytes' matmul_4bit dequantizes (to the
            # input's dtype), not through the dtype the weight was quantized from.
            out = nn.functional.linear(x, self.dequantize(self.compute_dtype), bias)
        else:
            out = bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=state)
        return out.to(out_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.quantized:
            raise QuantizationError(f"{prefix}weight is not quantized yet (deferred under init_module); "
                                    "set the model up or load a checkpoint before saving it")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "weight"
        extra = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + ".")}
        _base_load(self, state_dict, prefix, {key, *(key + "." + k for k in extra)}, *args)
        errors = args[-1]
        if key not in state_dict:
            if extra:
                errors.append(f"{key}: the checkpoint has its quantization state ({', '.join(sorted(extra))}) "
                              "but not the packed weight")
            return
        try:
            self._load_weight(_loaded(state_dict[key]), {k: _loaded(v) for k, v in extra.items()}, key)
        except QuantizationError as e:
            errors.append(str(e))

    def _load_weight(self, tensor, extra: dict, key: str) -> None:
        if tensor.is_floating_point():
            if extra:
                raise QuantizationError(f"{key}: a full-precision weight ({_dtype_str(tensor)}) with "
                                        f"quantization state keys ({', '.join(sorted(extra))}); a checkpoint "
                                        "holds one or the other")
            self.quantize_(_full_weight(self, tensor, key))
            return
        self._set_state(*self._prequantized(tensor, extra, key))

    def _prequantized(self, tensor, extra: dict, key: str):
        qs_keys = [k for k in extra if k.startswith("quant_state.")]
        expected_qs = f"quant_state.bitsandbytes__{self.weight.quant_type}"
        if len(qs_keys) != 1 or qs_keys[0] not in ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4"):
            found = ", ".join(f"{key}.{k}" for k in qs_keys) or "none"
            raise QuantizationError(
                f"{key}: a {_dtype_str(tensor)} (quantized) weight needs {key}.{expected_qs} and the other "
                f"quantization keys; found {found}. Save the checkpoint from a quantized model's "
                "state_dict(), or load full-precision weights")
        try:
            state = F.QuantState.from_dict(dict(extra), device=_device_of(self))
        except (ValueError, KeyError, AssertionError, TypeError) as e:
            raise QuantizationError(f"{key}: unreadable bitsandbytes quantization state ({e!r})") from None
        shape = (self.out_features, self.in_features)
        if tuple(state.shape) != shape:
            raise QuantizationError(f"size mismatch for {key}: the checkpoint was quantized from shape "
                                    f"{tuple(state.shape)}, this model's layer has shape {shape}")
        mine = (self.weight.quant_type, self.blocksize, bool(self.weight.compress_statistics))
        theirs = (state.quant_type, int(state.blocksize), bool(state.nested))
        if mine != theirs:
            raise QuantizationError(
                f"{key}: the checkpoint is {_describe(*theirs)}, this layer is {_describe(*mine)} "
                f"({self.quant_mode}); load full-precision weights to re-quantize, or use the policy the "
                "checkpoint was written under")
        n = shape[0] * shape[1]
        packed_shape = ((n + 1) // 2, 1)
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != packed_shape:
            raise QuantizationError(f"size mismatch for {key}: the checkpoint has a {_dtype_str(tensor)} tensor "
                                    f"of shape {tuple(tensor.shape)}, a {shape} layer packs into uint8 of "
                                    f"shape {packed_shape}")
        blocks = -(-n // state.blocksize)
        if state.absmax.numel() != blocks or (state.nested and state.state2.absmax.numel() != -(-blocks // state.state2.blocksize)):
            raise QuantizationError(f"size mismatch for {key}.absmax: {state.absmax.numel()} blocks in the "
                                    f"checkpoint, {blocks} for shape {shape} and blocksize {state.blocksize}")
        return tensor.to(_device_of(self)), state

    def _apply(self, fn, recurse=True):
        if _apply_empty(self, fn):
            return self
        super()._apply(fn, recurse)
        state = getattr(self.weight, "quant_state", None)
        if state is not None and state.absmax.device != self.weight.device:
            state.to(self.weight.device)
        if self.weight.device.type != "meta":
            self._dualprec_device = self.weight.device
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.quant_mode}, blocksize={self.blocksize}"

class QuantLinear8bit(bnb.nn.Linear8bitLt):
    """bitsandbytes' Linear8bitLt with loading and device moves that keep SCB."""

    @classmethod
    def empty(cls, in_features, out_features, bias, q, compute_dtype, param_dtype, device):
        training = q.mode == "int8-training"
        layer = cls(in_features, out_features, bias=bias, has_fp16_weights=training,
                    threshold=q.threshold, device="meta")
        layer.quant_mode, layer.compute_dtype, layer.param_dtype = q.mode, compute_dtype, param_dtype
        layer._dualprec_device = torch.device(device)
        return layer

    def quantize_(self, weight: torch.Tensor, device=None) -> None:
        device = torch.device(device) if device is not None else _device_of(self)
        w = weight.detach().to(device=device, dtype=self.param_dtype)
        if not torch.isfinite(w.to(torch.float16)).all():
            raise QuantizationError("the weight holds NaN or inf (after rounding to float16), which "
                                    "would poison its row's scale; fix the weights before quantizing")
        current = self.__dict__.get("_parameters", {}).get("weight")
        if (self.state.has_fp16_weights and isinstance(current, bnb.nn.Int8Params)
                and current.shape == w.shape and current.device == w.device):
            # loading into trainable weights: in place, so an optimizer holding them keeps them
            with torch.no_grad():
                current.copy_(w)
        elif self.state.has_fp16_weights:
            # int8-training keeps trainable weights and quantizes them in every forward
            self.weight = bnb.nn.Int8Params(w.contiguous(), requires_grad=True,
                                            has_fp16_weights=True)
        else:
            codes, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            self._set_state(codes, scb)
        self.state.CB = self.state.SCB = None

    def _set_state(self, codes, scb) -> None:
        self.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
        self.state.CB = self.state.SCB = None

    @property
    def quantized(self) -> bool:
        return self.weight.device.type != "meta"

    def dequantize(self) -> torch.Tensor:
        """The int8 weight as bitsandbytes' int8 matmul dequantizes it, codes * (SCB * (1/127))
        in float32, or the trainable weight (int8-training)."""
        if self.state.has_fp16_weights:
            return self.weight.data
        codes = self.weight.data
        scb = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
        return codes.float() * scb.float()[:, None].mul(1.0 / 127.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            raise QuantizationError("this Linear8bitLt has no weight yet (created under init_module and "
                                    "not set up): call precision.setup(model) or load a state dict first")
        out_dtype = self.compute_dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(self.compute_dtype)
        self.state.is_training = self.training
        if self.state.has_fp16_weights and x.device.type == "cpu":
            # bitsandbytes' CPU backend has no int8_double_quant kernel, which its eval path needs;
            # its training path (dequantize-then-matmul of the same int8 codes) runs everywhere.
            self.state.is_training = True
        if self.weight.CB is not None:
            self.init_8bit_state()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # bitsandbytes' int8 paths take [tokens, features]: its training backward calls
        # A.t() and fails on 3-D activations, and its outlier columns are found per call,
        # so leading dimensions are flattened (what the JAX layer does) and restored after
        lead = x.shape[:-1]
        out = bnb.matmul(x.reshape(-1, x.shape[-1]), self.weight, bias=bias, state=self.state)
        if not self.state.has_fp16_weights and self.state.CB is not None:
            self.weight.data = self.state.CB
        return out.reshape(*lead, out.shape[-1]).to(out_dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key, scb_key, fmt_key = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        own = {key, scb_key, fmt_key}
        _base_load(self, state_dict, prefix, own, *args)
        errors = args[-1]
        if key not in state_dict:
            if scb_key in state_dict:
                errors.append(f"{scb_key}: the checkpoint has the int8 scales but not {key}")
            return
        try:
            self._load_weight(_loaded(state_dict[key]), _loaded(state_dict.get(scb_key)),
                              _loaded(state_dict.get(fmt_key)), key)
        except QuantizationError as e:
            errors.append(str(e))

    def _load_weight(self, tensor, scb, fmt, key: str) -> None:
        _full_weight(self, tensor, key)
        if tensor.is_floating_point():
            if scb is not None:
                raise QuantizationError(f"{key}: a full-precision weight with {key[:-6]}SCB; a checkpoint "
                                        "holds one or the other")
            self.quantize_(tensor)
            return
        if self.state.has_fp16_weights:
            raise QuantizationError(f"{key}: an int8 (inference) checkpoint cannot resume int8-training, "
                                    "which trains the full-precision weights; load those instead")
        if tensor.dtype != torch.int8 or scb is None:
            raise QuantizationError(f"{key}: a {_dtype_str(tensor)} weight needs int8 codes with "
                                    f"{key[:-6]}SCB (one float32 scale per row); found "
                                    f"{'no SCB' if scb is None else 'codes of dtype ' + _dtype_str(tensor)}")
        if tuple(scb.shape) != (self.out_features,):
            raise QuantizationError(f"size mismatch for {key[:-6]}SCB: the checkpoint has shape "
                                    f"{tuple(scb.shape)}, this layer has {self.out_features} rows")
        if fmt is not None and int(fmt) != 0:
            raise QuantizationError(f"{key[:-6]}weight_format: only bitsandbytes' row-major format (0) is "
                                    f"supported, got {int(fmt)}")
        device = _device_of(self)
        self._set_state(tensor.to(device), scb.to(device=device, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        if _apply_empty(self, fn):
            return self
        super()._apply(fn, recurse)
        w = self.weight
        if getattr(w, "SCB", None) is not None and w.SCB.device != w.device:
            w.SCB = w.SCB.to(w.device)
        if self.state.has_fp16_weights:
            self.state.CB = self.state.SCB = None  # re-quantized from the weights in the next forward
        else:
            if getattr(w, "CB", None) is not None:
                w.CB = w.data
            if self.state.CB is not None:
                self.state.CB = w.data
            if self.state.SCB is not None and self.state.SCB.device != w.device:
                self.state.SCB = self.state.SCB.to(w.device)
        if w.device.type != "meta":
            self._dualprec_device = w.device
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.quant_mode}, threshold={self.state.threshold}"


def _describe(quant_type: str, blocksize: int, nested: bool) -> str:
    return f"{quant_type}{'-dq' if nested else ''} with blocksize {blocksize}"


def _describe(quant_type: str, blocksize: int, nested: bool) -> str:
    return f"{quant_type}{'-dq' if nested else ''} with blocksize {blocksize}"
