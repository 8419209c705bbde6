"""A stand-in ``transformer_engine`` package (TE needs a CUDA build and cannot be installed
here): TE 2.x's API (``autocast``, ``quantized_model_init``, ``Float8CurrentScaling``,
``MXFP8BlockScaling``, ``NVFP4BlockScaling``) or, with ``new_api=False``, TE 1.x's
(``fp8_autocast``, ``fp8_model_init``, DelayedScaling only).  Recipe objects record their
keyword arguments in ``kwargs``.  Its layers record their
constructor arguments and compute in plain torch; ``calls`` records every context entered
and every TE layer's forward.  Used by tests/torch/test_torch_fp8_te.py and
tests/torch/test_torch_fabric_lightning_gpu.py."""

import enum
import types

import torch
from torch import nn


class _Recorder(nn.Module):
    """A TE layer stand-in: keeps its constructor arguments and TE's parameter names."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def stand_in(new_api=True):
    calls = []

    class Format(enum.Enum):
        E4M3 = "E4M3"
        HYBRID = "HYBRID"

    class DelayedScaling:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Float8CurrentScaling(DelayedScaling):
        pass

    class MXFP8BlockScaling(DelayedScaling):  # TE >= 2.0
        pass

    class NVFP4BlockScaling(DelayedScaling):  # TE >= 2.8
        pass

    class Linear(_Recorder):
        def __init__(self, in_features, out_features, bias=True, **kwargs):
            super().__init__(in_features, out_features, bias=bias, **kwargs)
            self.weight = nn.Parameter(torch.zeros(out_features, in_features))
            self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

        def forward(self, x):
            calls.append(("forward", type(self).__name__))
            return nn.functional.linear(x, self.weight, self.bias)

    class LayerNorm(_Recorder):
        def __init__(self, hidden_size, eps=1e-5, **kwargs):
            super().__init__(hidden_size, eps=eps, **kwargs)
            self.weight, self.bias = nn.Parameter(torch.zeros(hidden_size)), nn.Parameter(torch.zeros(hidden_size))

        def forward(self, x):
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.kwargs["eps"])

    class LayerNormLinear(Linear):
        def __init__(self, in_features, out_features, eps=1e-5, bias=True, **kwargs):
            super().__init__(in_features, out_features, bias=bias, eps=eps, **kwargs)
            self.layer_norm_weight = nn.Parameter(torch.zeros(in_features))
            self.layer_norm_bias = nn.Parameter(torch.zeros(in_features))

        def forward(self, x):
            calls.append(("forward", "LayerNormLinear"))
            h = nn.functional.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias,
                                         self.kwargs["eps"])
            return nn.functional.linear(h, self.weight, self.bias)

    class _Context:
        def __init__(self, name, kwargs):
            self.name, self.kwargs = name, kwargs

        def __enter__(self):
            calls.append((self.name, self.kwargs))

        def __exit__(self, *exc):
            calls.append(("exit " + self.name, None))

    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.Linear, pytorch.LayerNorm, pytorch.LayerNormLinear = Linear, LayerNorm, LayerNormLinear
    if new_api:
        pytorch.autocast = lambda **kw: _Context("autocast", kw)
        pytorch.quantized_model_init = lambda **kw: _Context("quantized_model_init", kw)
    else:
        pytorch.fp8_autocast = lambda **kw: _Context("fp8_autocast", kw)
        pytorch.fp8_model_init = lambda **kw: _Context("fp8_model_init", kw)
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format, recipe.DelayedScaling = Format, DelayedScaling
    if new_api:
        recipe.Float8CurrentScaling = Float8CurrentScaling
        recipe.MXFP8BlockScaling, recipe.NVFP4BlockScaling = MXFP8BlockScaling, NVFP4BlockScaling
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe
    root = types.ModuleType("transformer_engine")
    root.pytorch, root.common = pytorch, common
    modules = {"transformer_engine": root, "transformer_engine.pytorch": pytorch,
               "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}
    return modules, calls
