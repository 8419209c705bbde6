"""The PyTorch side of the suite: drives ``dualprec_torch.Precision`` through the Backend
interface (init_module, setup, autocast, convert_input/convert_output, backward, unscale_,
step, state_dict)."""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np

from ..zoo import ModelSpec
from .base import Backend, Optim, Session, StepInfo


def to_numpy(t) -> np.ndarray:
    """A tensor's exact bits as NumPy (bfloat16 via ml_dtypes; numpy cannot take it directly)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def from_numpy(a: np.ndarray):
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _dtype_str(dt) -> str:
    return str(dt).replace("torch.", "")


class TorchBackend(Backend):
    """``precision_cls`` defaults to dualprec_torch.Precision; tests pass a stand-in."""

    name = "torch"
    package = "dualprec_torch"

    def __init__(self, precision_cls=None):
        super().__init__(precision_cls)
        from ..kernels import install_from_env

        self.reordered = install_from_env()  # DUALPREC_CONFORMANCE_REORDER: another summation order

    def float32_matmul_mode(self):
        """torch's float32 matmul precision: "highest" is IEEE float32; "high" lets CUDA
        use TF32 (and oneDNN bfloat16x3 passes on CPU); "medium" bfloat16.  The suite runs
        its models on the CPU unless ``DUALPREC_CONFORMANCE_DEVICE`` says otherwise."""
        import torch

        mode = {"highest": "ieee", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]
        if torch.backends.cuda.matmul.allow_tf32 and mode == "ieee" and torch.cuda.is_available():
            mode = "tf32"
        return mode

    def convert_input(self, policy, x):
        return to_numpy(self.precision(policy).convert_input(from_numpy(x)))

    def convert_output(self, policy, x):
        return to_numpy(self.precision(policy).convert_output(from_numpy(x)))

    def block_parts(self, x, w, g, recipe, seed, step):
        import torch

        from dualprec_torch import blockscale

        parts = blockscale.block_linear_parts(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g),
                                              recipe, seed, step)
        fp8 = {torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e5m2: ml_dtypes.float8_e5m2}
        return {k: (v.view(torch.uint8).numpy().view(fp8[v.dtype]).copy() if v.dtype in fp8 else to_numpy(v))
                for k, v in parts.items()}

    def session(self, spec, policy, weights, weight_map, optim):
        return TorchSession(self.precision(policy), spec, weights, optim)


class TorchSession(Session):
    def __init__(self, prec, spec: ModelSpec, weights: Mapping[str, np.ndarray], optim: Optim):
        import torch

        self.prec, self.spec = prec, spec
        with prec.init_module():
            model = spec.torch_module()
        with torch.no_grad():
            trained = {n for n, _ in model.named_parameters()}
            for name, p in model.state_dict().items():
                if name not in weights and name not in trained:
                    continue  # a buffer or a tied alias: the model's own (compare() leaves them out)
                # copy_ rounds the float32 canonical weights to the param dtype (RNE).
                p.copy_(torch.from_numpy(np.asarray(weights[name], np.float32)))
        if optim.kind == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=optim.lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=optim.lr)
        self.model, self.opt = prec.setup(model, opt)
        if any(getattr(m, "quant_mode", None) == "int8" for _, m in self._quant_layers()):
            # int8 is LLM.int8 inference: bitsandbytes runs it in eval mode (int8 activations x
            # int8 codes, what JAX's layers always do). In train mode its CPU path multiplies
            # the dequantized float16 weight and never quantizes the activations (25 float16
            # ULP apart on the MLP's fc1). The zoo has no dropout or batch norm, so eval mode
            # changes the int8 layers only; gradients still flow (MatMul8bitLt's backward).
            self._module().eval()

    def _module(self):
        m = self.model
        return getattr(m, "module", m)

    def _float_params(self):
        """named_parameters without the frozen quantized codes (bitsandbytes' Params4bit /
        Int8Params of inference layers, which are no float parameters)."""
        frozen = self.quant_frozen()
        return [(n, p) for n, p in self._module().named_parameters() if n not in frozen]

    def param_dtypes(self):
        return {n: _dtype_str(p.dtype) for n, p in self._float_params()}

    def params(self):
        return {n: to_numpy(p) for n, p in self._float_params()}

    # -- quantized layers ---------------------------------------------------------------
    def _quant_layers(self):
        from dualprec_torch import quant

        return quant.quantized_layers(self._module())

    def _int8_training(self):
        return [(path, m) for path, m in self._quant_layers()
                if getattr(m, "quant_mode", None) == "int8-training"]

    def quant_frozen(self):
        return {f"{path}.weight" for path, m in self._quant_layers()
                if getattr(m, "quant_mode", None) != "int8-training"}

    def quant_state(self):
        from dualprec_torch import quant

        training = {path for path, _ in self._int8_training()}
        out = {k: v.copy() for k, v in quant.state_tensors(self._module()).items()
               if not k.endswith(".bias") and k.rsplit(".", 1)[0] not in training}
        if training:
            import torch
            from bitsandbytes import functional as bnbF

            for path, m in self._int8_training():
                # the codes its forward makes (bitsandbytes' quantizer on the float16 weight)
                codes, scb, _ = bnbF.int8_vectorwise_quant(m.weight.detach().to(torch.float16).contiguous())
                out[f"{path}.weight.int8"], out[f"{path}.SCB"] = to_numpy(codes), to_numpy(scb)
        return out

    def dequantized(self):
        out = {}
        for path, m in self._quant_layers():
            mode = getattr(m, "quant_mode", None)
            if mode == "int8":
                # what bitsandbytes multiplies with (MatMul8bitFp's forward, MatMul8bitLt's input
                # gradient): CB * (SCB * (1/127)) in float32.  (QuantLinear8bit.dequantize()
                # rounds SCB / 127 instead, 1 float32 ULP off on some elements.)
                import torch

                scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB  # moved by a forward
                w = m.weight.data.to(torch.float32) * (scb.to(torch.float32)[:, None] * (1.0 / 127.0))
                out[f"{path}.weight"] = to_numpy(w)
            elif mode != "int8-training":
                out[f"{path}.weight"] = to_numpy(m.dequantize())
        return out

    def frozen_with_grad(self):
        return list(getattr(self, "_frozen_with_grad", []))

    def fp8_state(self):
        from dualprec_torch import fp8

        return {k: to_numpy(v) for k, v in fp8.state_tensors(self._module()).items()}

    def _run(self, x):
        with self.prec.autocast():
            out = self.model(self.prec.convert_input(from_numpy(x)))
        return self.prec.convert_output(out)

    def _grad_tensors(self):
        """Gradients by canonical name, read from the optimizer's parameters: with master
        weights those are the float32 copies the gradients were moved onto."""
        names = [n for n, _ in self._float_params()]
        params = [p for g in self.opt.param_groups for p in g["params"]]
        return dict(zip(names, (p.grad for p in params)))

    def forward(self, x):
        import torch

        seen, inputs = {}, {}

        def hook(mod, inp, out, n):
            if isinstance(out, torch.Tensor):
                seen[n] = to_numpy(out)
            if inp and isinstance(inp[0], torch.Tensor):
                inputs[n] = to_numpy(inp[0])

        hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: hook(mod, inp, out, n))
                 for n, m in self._module().named_modules() if n]
        try:
            with torch.no_grad():
                out = self._run(x)
        finally:
            for h in hooks:
                h.remove()
        self._inputs = inputs
        return to_numpy(out), seen

    def layer_inputs(self):
        return dict(getattr(self, "_inputs", {}))

    def module_kinds(self):
        return {n: type(m).__name__ for n, m in self._module().named_modules() if n}

    def run_layers(self, x, inputs):
        import torch

        mods = dict(self._module().named_modules())
        out = {}
        for name, a in inputs.items():
            got = {}

            def pre(mod, args, a=a):
                return (from_numpy(a), *args[1:])

            def post(mod, args, o):
                got["o"] = to_numpy(o)

            hs = [mods[name].register_forward_pre_hook(pre), mods[name].register_forward_hook(post)]
            try:
                with torch.no_grad():
                    self._run(x)
            finally:
                for h in hs:
                    h.remove()
            out[name] = got["o"]
        return out

    def run_glue(self, x, inputs, outputs):
        import torch

        mods = dict(self._module().named_modules())
        got, replaced, hs = {}, set(), []

        def pre(mod, args, a):
            return (from_numpy(a), *args[1:]) if args and tuple(args[0].shape) == a.shape else None

        def child(mod, args, o, name, a):
            if isinstance(o, torch.Tensor) and tuple(o.shape) == a.shape:
                replaced.add(name)
                return from_numpy(a).to(o.dtype)
            return None

        def post(mod, args, o, name):
            got[name] = to_numpy(o)

        try:
            for n, a in inputs.items():
                hs += [mods[n].register_forward_pre_hook(lambda m, args, a=a: pre(m, args, a)),
                       mods[n].register_forward_hook(lambda m, args, o, n=n: post(m, args, o, n))]
            for n, a in outputs.items():
                hs.append(mods[n].register_forward_hook(lambda m, args, o, n=n, a=a: child(m, args, o, n, a)))
            with torch.no_grad():
                self._run(x)
        finally:
            for h in hs:
                h.remove()
        return {n: o for n, o in got.items()
                if {c for c in outputs if c.startswith(n + ".")} <= replaced}

    def grad_dtypes(self):
        return dict(getattr(self, "_grad_dtypes", {}))

    def optimizer_state_dtypes(self):
        # by position: with master weights the optimizer holds float32 copies, not the params
        names = [n for n, _ in self._float_params()]
        params = [p for g in self.opt.param_groups for p in g["params"]]
        out = {}
        for name, p in zip(names, params):
            for k, v in self.opt.state.get(p, {}).items():
                if hasattr(v, "dtype") and v.dim() > 0:
                    out[f"{name}.{k}"] = _dtype_str(v.dtype)
        return out

    def _loss(self, x, y, mult=1.0):
        import torch
        import torch.nn.functional as F

        logits = self._run(x)
        # The loss runs in float32 at least: half outputs are upcast, float64 kept.
        wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        if wide.ndim > 2:  # F.cross_entropy wants the classes at dim 1
            wide = torch.movedim(wide, self.spec.class_axis % wide.ndim, 1)
        with self.prec.autocast():
            loss = F.cross_entropy(wide, torch.from_numpy(y))
        return loss, loss * mult if mult != 1.0 else loss

    def loss_and_grads(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self._loss(x, y)
        self.prec.backward(loss)
        self._grad_dtypes = {n: _dtype_str(p.grad.dtype) for n, p in self._module().named_parameters()
                             if p.grad is not None}
        frozen = self.quant_frozen()
        self._frozen_with_grad = [n for n, p in self._module().named_parameters()
                                  if n in frozen and (p.requires_grad or p.grad is not None)]
        self.prec.unscale_(self.opt)
        grads = {n: to_numpy(g) for n, g in self._grad_tensors().items()}
        self.opt.zero_grad(set_to_none=True)
        # Unscaled but not stepped: restoring the state ends the iteration without a step.
        self.prec.load_state_dict(self.prec.state_dict())
        return float(loss.detach()), grads

    def train_step(self, x, y, loss_multiplier=1.0):
        self.opt.zero_grad(set_to_none=True)
        loss, scaled = self._loss(x, y, loss_multiplier)
        self.prec.backward(scaled)
        stepped = self.prec.step(self.opt)
        state = self.prec.state_dict() or {}
        ls = state.get("loss_scale", state)
        scale, counter = float(ls.get("scale", 1.0)), int(ls.get("counter", 0))
        return StepInfo(float(loss.detach()), scale, counter, skipped=not bool(stepped),
                        opt_steps=self._opt_steps())

    def _opt_steps(self):
        steps = [int(s["step"]) for s in self.opt.state.values() if "step" in s]
        return max(steps) if steps else (0 if isinstance(self.opt, __import__("torch").optim.Adam) else None)
