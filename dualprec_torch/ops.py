"""The mixed-precision op policy in torch: matmul-like ops in the compute dtype (torch.autocast),
normalisation, softmax, reductions and losses in float32 on every device.

torch's CUDA autocast lists run most of these in float32 already; its CPU lists leave
layer_norm, group_norm, softmax, log_softmax and the reductions in bfloat16/float16.  The
backend closes that gap with a torch function mode, active only inside a mixed policy's
compute context: it sees every torch call made there, module or functional (`nn.LayerNorm`
and a bare `F.softmax` in user code alike), and upcasts the half-precision tensor arguments
of the functions in `FP32_OPS` to float32.  Those functions then return float32, as torch's
CUDA autocast "fp32" list makes them do.  Everything else passes through unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .casts import HALF_TORCH_DTYPES, default_dtype, torch_dtype

__all__ = ["FP32_OPS", "Fp32Ops", "compute_context"]

#: Every function the op policy runs in float32, by the name users call it with.
FP32_OPS = (
    # normalisation
    "torch.nn.functional.layer_norm", "torch.layer_norm",
    "torch.nn.functional.rms_norm", "torch.rms_norm",
    "torch.nn.functional.group_norm", "torch.group_norm",
    "torch.nn.functional.batch_norm", "torch.batch_norm",
    "torch.nn.functional.instance_norm", "torch.instance_norm",
    # softmax
    "torch.nn.functional.softmax", "torch.softmax", "torch.Tensor.softmax", "torch.special.softmax",
    "torch.nn.functional.log_softmax", "torch.log_softmax", "torch.Tensor.log_softmax",
    "torch.special.log_softmax",
    # reductions
    "torch.sum", "torch.Tensor.sum", "torch.mean", "torch.Tensor.mean",
    "torch.prod", "torch.Tensor.prod", "torch.cumsum", "torch.Tensor.cumsum",
    "torch.cumprod", "torch.Tensor.cumprod", "torch.logsumexp", "torch.Tensor.logsumexp",
    "torch.var", "torch.Tensor.var", "torch.std", "torch.Tensor.std",
    "torch.norm", "torch.Tensor.norm", "torch.linalg.vector_norm",
    # losses
    "torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss",
    "torch.nn.functional.mse_loss", "torch.nn.functional.l1_loss",
    "torch.nn.functional.smooth_l1_loss", "torch.nn.functional.huber_loss",
    "torch.nn.functional.kl_div", "torch.nn.functional.binary_cross_entropy",
    "torch.nn.functional.binary_cross_entropy_with_logits", "torch.nn.functional.poisson_nll_loss",
    "torch.nn.functional.gaussian_nll_loss", "torch.nn.functional.cosine_embedding_loss",
    "torch.nn.functional.margin_ranking_loss", "torch.nn.functional.hinge_embedding_loss",
    "torch.nn.functional.soft_margin_loss", "torch.nn.functional.multilabel_soft_margin_loss",
    "torch.nn.functional.multilabel_margin_loss", "torch.nn.functional.multi_margin_loss",
    "torch.nn.functional.triplet_margin_loss",
)

# batch_norm / instance_norm update their running statistics in place: upcasting those
# arguments would update a temporary copy, so only input, weight and bias are upcast.
_RUNNING_STATS = {"running_mean", "running_var"}
_RUNNING_STAT_POSITIONS = {1, 2}


def _resolve(name: str):
    obj = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_FUNCS = {f for f in map(_resolve, FP32_OPS) if f is not None}
_STATEFUL = {f for f in (F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm)}


def _up(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in HALF_TORCH_DTYPES else x


class Fp32Ops(TorchFunctionMode):
    """Upcast the half-precision tensor arguments of `FP32_OPS` to float32.

    A call that names its own ``dtype`` (``x.sum(dtype=torch.bfloat16)``) is left alone:
    the user asked for that dtype, as torch's autocast respects it too.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCS and kwargs.get("dtype") is None:
            if func in _STATEFUL:
                args = tuple(a if i in _RUNNING_STAT_POSITIONS else _up(a) for i, a in enumerate(args))
                kwargs = {k: v if k in _RUNNING_STATS else _up(v) for k, v in kwargs.items()}
            else:
                args = tuple(map(_up, args))
                kwargs = {k: _up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def compute_context(policy, device_type: str, *, nested: bool = False):
    """The context a policy's forward (and loss) runs in.

    Mixed (params wider than compute): torch.autocast to the compute dtype plus `Fp32Ops`.
    Otherwise ("-true"): no autocast (turned off when ``nested`` inside a mixed parent, for
    a per-module override) and, as Fabric does, the compute dtype as torch's default dtype so
    tensors created in forward get it.
    """
    compute = torch_dtype(policy.compute_dtype)
    with contextlib.ExitStack() as stack:
        if policy.is_mixed:
            stack.enter_context(torch.autocast(device_type, dtype=compute))
            stack.enter_context(Fp32Ops())
        else:
            if nested:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            if compute != torch.get_default_dtype():
                stack.enter_context(default_dtype(compute))
        yield
