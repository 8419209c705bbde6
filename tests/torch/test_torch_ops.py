"""The op policy inside autocast() (torch's CUDA autocast table), module and functional
forms, on CPU.  Per-entry dtypes against CUDA autocast: test_torch_ops_table.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualprec import optable
from dualprec_torch import FP32_OPS, Precision

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
        "F.softmax": F.softmax(x, dim=-1),
        "torch.softmax": torch.softmax(x, -1),
        "Tensor.softmax": x.softmax(-1),
        "F.log_softmax": F.log_softmax(x, dim=-1),
        "Tensor.log_softmax": x.log_softmax(-1),
        "Tensor.sum": x.sum(),
        "Tensor.logsumexp": x.logsumexp(-1),
        "Tensor.exp": x.exp(),
        "pow": x.pow(2),
        "rsqrt": (x * x + 1).rsqrt(),
        "Tensor.norm": x.norm(dim=-1),
        "F.cross_entropy": F.cross_entropy(x, y),
        "nn.CrossEntropyLoss": nn.CrossEntropyLoss()(x, y),
        "F.mse_loss": F.mse_loss(x, x * 0.5),
        "F.kl_div": F.kl_div(x, x, reduction="batchmean", log_target=True),
    }


@pytest.mark.parametrize("policy,compute", [("bf16-mixed", bf16), ("16-mixed", f16)])
def test_fp32_list_returns_float32_under_autocast(policy, compute):
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
    assert plain["nn.LayerNorm"] == plain["F.softmax"] == plain["Tensor.sum"] == plain["Tensor.exp"] == bf16


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
        # on no CUDA autocast list: they stay in the compute dtype
        assert x.mean().dtype == x.var().dtype == x.std().dtype == bf16
        assert nn.BatchNorm1d(4).to(bf16)(x).dtype == bf16


def test_batch_norm_running_stats_are_updated_in_place():
    prec = Precision("bf16-mixed")
    bn = nn.BatchNorm1d(4)
    with prec.autocast():
        out = bn(torch.randn(8, 4) + 3.0)
    assert out.dtype == f32  # batch_norm is on no list: float32 input, float32 output
    assert bn.running_mean.dtype == f32 and float(bn.running_mean.mean()) > 0.1


def test_the_table_is_off_after_the_context():
    prec = Precision("bf16-mixed")
    x = torch.randn(4, 4).to(bf16)
    with pytest.raises(ZeroDivisionError):
        with prec.autocast():
            raise ZeroDivisionError
    assert torch.softmax(x, -1).dtype == bf16
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=bf16):  # plain CPU autocast keeps its own lists
        assert torch.softmax(x, -1).dtype == x.exp().dtype == bf16


def _resolve(name):
    obj = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_fp32_ops_is_the_tables_fp32_list_and_resolves():
    assert set(FP32_OPS) == {n for e in optable.FP32 for n in e.torch}
    assert "torch.mean" not in FP32_OPS and "torch.exp" in FP32_OPS
    for name in FP32_OPS:
        _resolve(name)


def test_gradients_flow_through_the_casts():
    prec = Precision("bf16-mixed")
    x = torch.randn(4, 6, dtype=bf16, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    with prec.autocast():
        y = F.layer_norm(x, (6,), w) + x.exp() + x.pow(2).mean(-1, keepdim=True).rsqrt()
        assert y.dtype == f32
        y.sum().backward()
    assert x.grad.dtype == bf16 and w.grad.dtype == f32
    # the same casts written by hand: each listed op upcasts its own operands
    want_x = x.detach().clone().requires_grad_()
    want_w = w.detach().clone().requires_grad_()
    up = want_x.float
    (F.layer_norm(up(), (6,), want_w) + up().exp() + up().pow(2).mean(-1, keepdim=True).rsqrt()).sum().backward()
    assert torch.equal(w.grad, want_w.grad)
    assert torch.equal(x.grad, want_x.grad)


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


# ----- training against the hand-written loop ------------------------------------------------
class ConvMLP(nn.Module):
    """Conv1d + MLP + residual, ending in a mean over time: every op either on a list both CPU
    and CUDA autocast agree on (conv, linear, mse) or on none (gelu, add, mean)."""

    def __init__(self, c=8, hidden=16):
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.head = nn.Linear(c, 1)

    def forward(self, x):  # x: (batch, channels, time)
        h = self.conv(x).transpose(1, 2)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


class RMSNormMLP(ConvMLP):
    """ConvMLP with a hand-written RMSNorm (pow, mean, rsqrt) and an exp: ops CPU autocast
    leaves in bfloat16 and CUDA autocast (hence Precision) runs in float32.  ``up`` is where
    a hand-written model puts the CUDA table's float32 casts itself."""

    up = staticmethod(lambda t: t)

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        up = self.up
        h = h * up(up(h).pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1)) + up(h[:, :1, :1]).exp().mean(1)


def _train(model, step, steps=8, device="cpu"):
    torch.manual_seed(1)
    data = [(torch.randn(4, 8, 12, device=device), torch.randn(4, 1, device=device)) for _ in range(steps)]
    means = []
    for x, y in data:
        means.append(step(x, y))
    return [p.detach().clone() for p in model.parameters()], means


def _hand(model, compute, scaled, device="cpu"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device) if scaled else None

    def step(x, y):
        opt.zero_grad()
        with torch.autocast(device, dtype=compute):
            loss = F.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return loss.dtype
    return step


def _through_precision(model, policy, device="cpu"):
    prec = Precision(policy, device=device)
    model, opt = prec.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))

    def step(x, y):
        opt.zero_grad()
        with prec.autocast():
            loss = F.mse_loss(model(x), y)
        prec.backward(loss)
        prec.step(opt)
        prec.update()
        return loss.dtype
    return step


@pytest.mark.parametrize("policy,compute", [("bf16-mixed", bf16), ("16-mixed", f16)])
def test_training_bit_identical_to_hand_written_autocast(policy, compute):
    """Where CPU autocast already agrees with the CUDA table, Precision is torch.autocast (+
    GradScaler) exactly: the mean over time stays in the compute dtype (it was float32)."""
    torch.manual_seed(0)
    hand_model = ConvMLP()
    prec_model = ConvMLP()
    prec_model.load_state_dict(hand_model.state_dict())
    hand, _ = _train(hand_model, _hand(hand_model, compute, policy == "16-mixed"))
    ours, _ = _train(prec_model, _through_precision(prec_model, policy))
    for a, b in zip(hand, ours):
        assert torch.equal(a, b)
    with Precision(policy, device="cpu").autocast():
        h = prec_model.conv(torch.randn(2, 8, 5)).transpose(1, 2)
        assert h.mean(1).dtype == compute


@pytest.mark.parametrize("policy,compute", [("bf16-mixed", bf16), ("16-mixed", f16)])
def test_cuda_table_ops_match_hand_written_float32_casts(policy, compute):
    """pow/rsqrt/exp in float32, mean left alone: Precision on CPU equals a hand-written
    autocast loop that writes CUDA's float32 casts itself, bit for bit, and differs from
    plain CPU autocast."""
    torch.manual_seed(0)
    hand_model, prec_model, plain_model = RMSNormMLP(), RMSNormMLP(), RMSNormMLP()
    prec_model.load_state_dict(hand_model.state_dict())
    plain_model.load_state_dict(hand_model.state_dict())
    hand_model.up = lambda t: t.float()
    hand, _ = _train(hand_model, _hand(hand_model, compute, policy == "16-mixed"))
    ours, _ = _train(prec_model, _through_precision(prec_model, policy))
    plain, _ = _train(plain_model, _hand(plain_model, compute, policy == "16-mixed"))
    for a, b in zip(hand, ours):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(plain, ours))
    x = torch.randn(3, 5).to(compute)
    with Precision(policy, device="cpu").autocast():
        assert x.pow(2).dtype == x.rsqrt().dtype == x.exp().dtype == f32
        assert x.mean(-1).dtype == compute


def test_cuda_context_is_plain_autocast():
    """On CUDA nothing is added per op: the CPU table is not switched on."""
    from dualprec import Policy
    from dualprec_torch import ops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch.autocast("cuda") warns and turns off
        with ops.compute_context(Policy.parse("bf16-mixed"), "cuda"):
            assert ops._STATE.depth == 0
    with ops.compute_context(Policy.parse("bf16-mixed"), "cpu"):
        assert ops._STATE.depth == 1
    assert ops._STATE.depth == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("policy,compute", [("bf16-mixed", bf16), ("16-mixed", f16)])
def test_cuda_training_bit_identical_to_hand_written_autocast(policy, compute):
    torch.manual_seed(0)
    models = [RMSNormMLP().cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    hand, _ = _train(models[0], _hand(models[0], compute, policy == "16-mixed", "cuda"), device="cuda")
    ours, _ = _train(models[1], _through_precision(models[1], policy, "cuda"), device="cuda")
    for a, b in zip(hand, ours):
        assert torch.equal(a, b)


# ----- which kernels: C++ (built on first use) or Python ----------------------------------------
def test_cpp_kernels_are_the_default_and_run_the_table():
    from dualprec_torch import ops

    x = torch.randn(4, 8).to(bf16)
    with Precision("bf16-mixed", device="cpu").autocast():
        assert x.exp().dtype == f32
    assert ops.kernel_language() == "c++"  # this machine has a compiler: the C++ kernels are in use


def test_kernels_env_rejects_an_unknown_value(monkeypatch):
    from dualprec_torch import ops

    monkeypatch.setenv(ops.KERNELS_ENV, "fortran")
    with pytest.raises(ValueError, match="expected 'c\\+\\+' or 'python'"):
        ops._native_lib()


def test_failed_cpp_build_falls_back_to_python_with_a_warning_or_raises_when_asked(monkeypatch):
    from dualprec_torch import ops

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ops, "_build_native", no_compiler)
    monkeypatch.setattr(ops, "_native", {})
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="could not build the C\\+\\+ op-table kernels .*Ninja is required"):
        assert ops._native_lib() is None
    monkeypatch.setattr(ops, "_native", {})
    monkeypatch.setenv(ops.KERNELS_ENV, "c++")
    with pytest.raises(RuntimeError, match="building dualprec_torch's C\\+\\+ op-table kernels failed"):
        ops._native_lib()
    monkeypatch.setenv(ops.KERNELS_ENV, "python")
    assert ops._native_lib() is None
