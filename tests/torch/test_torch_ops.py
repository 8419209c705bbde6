"""The float32 op policy inside autocast(), module and functional forms, on CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualprec_torch import FP32_OPS, Precision
from dualprec_torch.ops import _FUNCS

bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32


def _calls(x, y):
    """One call per covered form; each returns a tensor that must come out float32."""
    d = x.shape[-1]
    w = torch.ones(d, dtype=x.dtype)
    return {
        "nn.LayerNorm": nn.LayerNorm(d)(x),
        "F.layer_norm": F.layer_norm(x, (d,), w, None),
        "nn.RMSNorm": nn.RMSNorm(d)(x),
        "nn.GroupNorm": nn.GroupNorm(2, d)(x),
        "nn.BatchNorm1d": nn.BatchNorm1d(d)(x),
        "F.softmax": F.softmax(x, dim=-1),
        "torch.softmax": torch.softmax(x, -1),
        "Tensor.softmax": x.softmax(-1),
        "F.log_softmax": F.log_softmax(x, dim=-1),
        "Tensor.log_softmax": x.log_softmax(-1),
        "Tensor.sum": x.sum(),
        "torch.mean": torch.mean(x, dim=0),
        "Tensor.logsumexp": x.logsumexp(-1),
        "Tensor.var": x.var(0),
        "F.cross_entropy": F.cross_entropy(x, y),
        "nn.CrossEntropyLoss": nn.CrossEntropyLoss()(x, y),
        "F.mse_loss": F.mse_loss(x, x * 0.5),
        "F.kl_div": F.kl_div(x, x, reduction="batchmean", log_target=True),
    }


@pytest.mark.parametrize("policy,compute", [("bf16-mixed", bf16), ("16-mixed", f16)])
def test_fp32_functions_return_float32_under_autocast(policy, compute):
    prec = Precision(policy)
    x = torch.randn(8, 6)
    y = torch.randint(0, 6, (8,))
    with prec.autocast():
        low = nn.Linear(6, 6)(x)
        assert low.dtype == compute  # the matmul ran in the compute dtype
        results = _calls(low, y)
    bad = {k: v.dtype for k, v in results.items() if v.dtype != f32}
    assert not bad, f"not float32 under {policy}: {bad}"


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
def test_plain_cpu_autocast_does_not_do_this():
    """The point of the op policy: without it CPU autocast leaves these in bfloat16."""
    x = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=bf16):
        low = nn.Linear(6, 6)(x)
        plain = {k: v.dtype for k, v in _calls(low, torch.zeros(8, dtype=torch.long)).items()}
    assert plain["nn.LayerNorm"] == plain["F.softmax"] == plain["Tensor.sum"] == bf16


def test_values_equal_explicit_float32():
    prec = Precision("bf16-mixed")
    x = torch.randn(4, 16).to(bf16)
    with prec.autocast():
        got = [F.layer_norm(x, (16,)), torch.softmax(x, -1), x.sum(-1)]
    want = [F.layer_norm(x.float(), (16,)), torch.softmax(x.float(), -1), x.float().sum(-1)]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_explicit_dtype_is_respected_and_other_ops_pass_through():
    prec = Precision("bf16-mixed")
    x = torch.randn(4, 4).to(bf16)
    with prec.autocast():
        assert x.sum(dtype=bf16).dtype == bf16
        assert F.gelu(x).dtype == bf16
        assert (x + x).dtype == bf16
        assert torch.matmul(x, x).dtype == bf16


def test_batch_norm_running_stats_are_updated_in_place():
    prec = Precision("bf16-mixed")
    bn = nn.BatchNorm1d(4)
    with prec.autocast():
        bn(torch.randn(8, 4).to(bf16) + 3.0)
    assert bn.running_mean.dtype == f32 and float(bn.running_mean.mean()) > 0.1


def test_the_mode_is_gone_after_the_context():
    prec = Precision("bf16-mixed")
    x = torch.randn(4, 4).to(bf16)
    with pytest.raises(ZeroDivisionError):
        with prec.autocast():
            raise ZeroDivisionError
    assert torch.softmax(x, -1).dtype == bf16
    assert not torch.is_autocast_enabled("cpu")


def test_every_listed_name_resolves_in_this_torch():
    assert len(_FUNCS) == len(set(FP32_OPS))


def test_true_policies_keep_their_dtype_and_set_the_default():
    prec = Precision("bf16-true")
    with prec.autocast():
        assert torch.zeros(2).dtype == bf16
        assert torch.softmax(torch.randn(3).to(bf16), -1).dtype == bf16
    assert torch.zeros(2).dtype == f32


def test_works_under_torch_compile():
    prec = Precision("bf16-mixed")
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 8)
    with prec.autocast():
        out = compiled(x)
        ref = model(x)
    assert out.dtype == f32 and torch.equal(out, ref)
