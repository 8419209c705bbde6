"""The dtype of every part of a training step, per policy, against a written table.

Columns: parameters, gradients (as backward leaves them on the model), optimizer state
(AdamW's moments), outputs (convert_output), matmuls inside autocast(), and the float32 op
policy's functions (LayerNorm, softmax) inside autocast().

Fabric's plugins give the same params / grads / optimizer state / outputs for its strings
(MixedPrecision, HalfPrecision, DoublePrecision, Precision); the deliberate differences are
in FABRIC_DIFFERS below and in dualprec_torch/README_SECTION.md.
"""

import pytest
import torch
import torch.nn.functional as F
from torch_support import make_batches, make_model, make_optimizer

from dualprec_torch import Precision

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

#             policy:                 params grads  opt-state outputs matmul norm/softmax
TABLE = {
    "32-true":               (f32,  f32,  f32,  f32,  f32,  f32),
    "64-true":               (f64,  f64,  f64,  f32,  f64,  f64),
    "16-true":               (f16,  f16,  f16,  f32,  f16,  f16),
    "bf16-true":             (bf16, bf16, bf16, f32,  bf16, bf16),
    "16-mixed":              (f32,  f32,  f32,  f32,  f16,  f32),
    "bf16-mixed":            (f32,  f32,  f32,  f32,  bf16, f32),
    "float64":               (f64,  f64,  f64,  f64,  f64,  f64),
    "bfloat16":              (bf16, bf16, bf16, bf16, bf16, bf16),
    "float16":               (f16,  f16,  f16,  f16,  f16,  f16),
    "mixed_bfloat16":        (f32,  f32,  f32,  bf16, bf16, f32),
    "mixed_float16":         (f32,  f32,  f32,  f16,  f16,  f32),
    "bf16-true,master=true": (bf16, bf16, f32,  f32,  bf16, bf16),
}

# What Fabric does for its strings where it differs from TABLE (CPU): its CPU autocast leaves
# norms and softmax in the compute dtype, and it has no master weights.
FABRIC_DIFFERS = {
    "16-mixed": {"norm/softmax": f16},
    "bf16-mixed": {"norm/softmax": bf16},
}


@pytest.mark.parametrize("policy", list(TABLE))
def test_dtype_table(policy):
    params, grads, state, outputs, matmul, fp32_ops = TABLE[policy]
    prec = Precision(policy)
    model = make_model("mlp")
    opt = make_optimizer(model.parameters())
    model, opt = prec.setup(model, opt)
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        h = model.fc1(prec.convert_input(x))
        normed = model.norm(h)
        soft = F.softmax(h, dim=-1)
        out = prec.convert_output(model(prec.convert_input(x)))
        loss = F.cross_entropy(out, y)
    assert {p.dtype for p in model.parameters()} == {params}
    assert (h.dtype, out.dtype) == (matmul, outputs)
    assert normed.dtype == soft.dtype == fp32_ops
    assert loss.dtype == (f32 if fp32_ops == f32 or outputs == f32 else outputs)
    prec.backward(loss)
    assert {p.grad.dtype for p in model.parameters()} == {grads}
    prec.step(opt)
    moments = {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"}
    assert moments == {state}


def test_fabric_differences_are_only_the_listed_ones():
    """Fabric's MixedPrecision on CPU is plain torch.autocast: the listed cells are what that
    gives, and every other cell of its strings equals TABLE."""
    for policy, cells in FABRIC_DIFFERS.items():
        compute = TABLE[policy][4]
        with torch.autocast("cpu", dtype=compute):
            h = torch.nn.Linear(8, 8)(torch.randn(4, 8))
            assert torch.nn.LayerNorm(8)(h).dtype == cells["norm/softmax"]
            assert F.softmax(h, -1).dtype == cells["norm/softmax"]
        assert TABLE[policy][5] != cells["norm/softmax"]
