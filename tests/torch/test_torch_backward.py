"""The CUDA table in torch's backward on CPU: recomputation, custom_bwd, higher-order gradients.

Backward runs outside the autocast block, as in torch's AMP recipe.  torch re-enters autocast
in three places there, with the state the forward had: the recomputation of a checkpointed
region (``torch.utils.checkpoint``, reentrant and not) and a ``torch.amp.custom_bwd`` backward.
On CUDA those regions get CUDA's table; on CPU `Precision` must give the same dtypes.

The reference: torch's own AutocastCUDA kernels, run on fake CUDA tensors without a GPU (as in
test_torch_ops_table).  Fake CUDA tensors cannot take part in autograd on a CPU-only build, so
each region's ops are replayed there without gradients: CUDA's checkpoint recomputes a region
under the forward's autocast state, so its dtypes are the forward's; a custom_bwd backward runs
under that state too, so its ops get what fake CUDA autocast gives for the same inputs.
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from dualprec_torch import Precision

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
POLICIES = [("bf16-mixed", bf16), ("16-mixed", f16)]


@contextlib.contextmanager
def fake_cuda_autocast(dtype):
    """torch's CUDA autocast kernels on fake CUDA tensors (no GPU, no autograd)."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            yield "cuda"
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.clear_autocast_cache()


# ----- a region with ops from every list ---------------------------------------------------
def region(rec, x, w, b, g, beta):
    """Linear (lower), layer_norm/softmax/exp/sum (fp32), gelu/mean (none), addcmul (promote)."""
    h = F.linear(x, w, b)
    n = F.layer_norm(h, (h.shape[-1],), g, beta)
    s = torch.softmax(h, -1)
    e = torch.exp(h)
    a = F.gelu(h) + n.mean(-1, keepdim=True)
    c = torch.addcmul(a, s, h)
    t = e.sum(-1, keepdim=True)
    rec.append(tuple(v.dtype for v in (h, n, s, e, a, c, t)))
    return c * t


def _params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 8), (8,), (8,), (8,)]
    return [(torch.randn(s, generator=g) * 0.3).to(device) for s in shapes]


def cuda_region_dtypes(compute):
    rec = []
    with fake_cuda_autocast(compute) as dev:
        x, *ps = [torch.randn(s, device=dev) for s in [(4, 8), (8, 8), (8,), (8,), (8,)]]
        region(rec, x, *ps)
    return rec[0]


def _cpu_run(policy, how, via_precision, x, ps):
    """One forward + backward on CPU under ``policy``; ``how``: plain / reentrant / non-reentrant."""
    rec = []
    prec = Precision(policy, device="cpu")
    with set_checkpoint_early_stop(False):  # the whole region recomputes, so rec sees it all
        with prec.autocast():
            if how == "plain":
                out = region(rec, x, *ps)
            else:
                out = checkpoint(region, rec, x, *ps, use_reentrant=(how == "reentrant"), preserve_rng_state=False)
            loss = out.float().mean() * 1e-3  # finite gradients at 16-mixed's loss scale 2**16
        if via_precision:
            prec.backward(loss)
        else:
            loss.backward()
    return rec


@pytest.mark.parametrize("via_precision", [True, False], ids=["precision.backward", "loss.backward"])
@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("policy,compute", POLICIES)
def test_checkpoint_recomputes_under_the_cuda_table(policy, compute, how, via_precision):
    want = cuda_region_dtypes(compute)
    x = torch.randn(4, 8).requires_grad_()
    ps = [p.requires_grad_() for p in _params()]
    rec = _cpu_run(policy, how, via_precision, x, ps)
    assert rec == [want, want], f"forward then recompute dtypes {rec}, CUDA autocast gives {want} for both"
    ckpt_grads = [t.grad.clone() for t in (x, *ps)]

    x2 = x.detach().clone().requires_grad_()
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    _cpu_run(policy, "plain", via_precision, x2, ps2)
    for i, (a, b) in enumerate(zip(ckpt_grads, (t.grad for t in (x2, *ps2)))):
        assert bool(a.isfinite().all()), f"gradient {i} not finite: the test needs a smaller loss"
        assert a.dtype == b.dtype and torch.equal(a, b), f"gradient {i}: checkpointed != not checkpointed"


def test_plain_autocast_after_precision_keeps_cpu_autocasts_rules():
    """A plain torch.autocast("cpu") forward after a Precision one: its recomputation follows
    CPU autocast's rules again (layer_norm and softmax stay bfloat16), so checkpoint agrees."""
    x = torch.randn(4, 8).requires_grad_()
    ps = [p.requires_grad_() for p in _params()]
    _cpu_run("bf16-mixed", "non-reentrant", False, x, ps)  # the table ran last in this thread
    rec = []
    with set_checkpoint_early_stop(False):
        with torch.autocast("cpu", dtype=bf16):
            out = checkpoint(region, rec, x, *ps, use_reentrant=False, preserve_rng_state=False)
        out.float().sum().backward()
    assert rec[0] == rec[1] and rec[0][1] == bf16 and rec[0][2] == bf16, rec


# ----- custom_bwd ------------------------------------------------------------------------
def backward_body(rec, x, g):
    e = torch.exp(x)
    s = torch.softmax(x, -1)
    m = g @ x.transpose(-2, -1).float()
    rec.append((e.dtype, s.dtype, m.dtype))
    return (g * e * s).to(x.dtype) + (m @ x.float()).to(x.dtype)


class _Custom(torch.autograd.Function):
    rec: list = []

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return backward_body(_Custom.rec, x, g)


@pytest.mark.parametrize("via_precision", [True, False], ids=["precision.backward", "loss.backward"])
@pytest.mark.parametrize("policy,compute", POLICIES)
def test_custom_bwd_backward_runs_under_the_cuda_table(policy, compute, via_precision):
    want = []
    with fake_cuda_autocast(compute) as dev:
        backward_body(want, torch.randn(3, 4, device=dev).to(compute), torch.randn(3, 4, device=dev).to(compute))
    assert want == [(f32, f32, compute)]  # exp and softmax float32, the matmul in the compute dtype

    _Custom.rec = []
    x = torch.randn(3, 4).to(compute).requires_grad_()
    prec = Precision(policy, device="cpu")
    with prec.autocast():
        loss = _Custom.apply(x).float().sum()
    prec.backward(loss) if via_precision else loss.backward()
    assert _Custom.rec == want


# ----- higher-order gradients -------------------------------------------------------------
def _penalty_step(policy, use_checkpoint):
    """torch's AMP gradient-penalty recipe through Precision: grad with create_graph outside
    the block, the penalty inside it, then backward."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    ps = [p.requires_grad_() for p in _params()]
    rec = []
    prec = Precision(policy, device="cpu")
    with set_checkpoint_early_stop(False):
        with prec.autocast():
            out = (checkpoint(region, rec, x, *ps, use_reentrant=False, preserve_rng_state=False)
                   if use_checkpoint else region(rec, x, *ps))
            loss = out.float().mean() * 1e-3
        scaled = torch.autograd.grad(prec.scale_loss(loss), ps, create_graph=True)
        grads = [g / prec.scale for g in scaled]
        with prec.autocast():
            penalty = sum(g.pow(2).sum() for g in grads).sqrt()
            total = loss + penalty
        prec.backward(total)
    return rec, [p.grad for p in ps], penalty


@pytest.mark.parametrize("policy,compute", POLICIES)
def test_higher_order_gradients_through_recomputation(policy, compute):
    rec, grads, penalty = _penalty_step(policy, use_checkpoint=True)
    want = cuda_region_dtypes(compute)
    assert rec and all(r == want for r in rec), (rec, want)  # forward and every recomputation
    assert penalty.dtype == f32  # pow and sum: float32 on CUDA's list
    _, plain, _ = _penalty_step(policy, use_checkpoint=False)
    for i, (a, b) in enumerate(zip(grads, plain)):
        assert bool(a.isfinite().all()), f"parameter {i}: gradient not finite"
        assert a.dtype == b.dtype == f32 and torch.equal(a, b), f"parameter {i}"


# ----- cat / stack -------------------------------------------------------------------------
DTYPES = [f16, bf16, f32, f64]


def _outcome(fn):
    try:
        return fn().dtype
    except RuntimeError as e:
        return "error: " + str(e).splitlines()[0][:60]


@pytest.mark.parametrize("policy,compute", POLICIES)
def test_cat_and_stack_promote_as_cuda_does(policy, compute):
    bad, n = [], 0
    for op in (torch.cat, torch.stack):
        for a in DTYPES:
            for b in DTYPES:
                with fake_cuda_autocast(compute) as dev:
                    want = _outcome(lambda: op([torch.ones(2, device=dev).to(a), torch.ones(2, device=dev).to(b)]))
                with Precision(policy, device="cpu").autocast():
                    got = _outcome(lambda: op([torch.ones(2).to(a), torch.ones(2).to(b)]))
                n += 1
                if want != got:
                    bad.append(f"{op.__name__}({a}, {b}): cuda {want}, Precision/CPU {got}")
    assert n == 32 and not bad, "\n".join(bad)
    assert want == f64  # the fake CUDA run answered (f64, f64 last)


def test_cat_outside_precision_keeps_cpu_autocasts_rule():
    a = torch.ones(2).to(f16)
    with Precision("bf16-mixed", device="cpu").autocast():
        pass
    with torch.autocast("cpu", dtype=bf16):
        with pytest.raises(RuntimeError, match="Unexpected floating ScalarType"):
            torch.cat([a, a])
        assert torch.cat([torch.ones(2).to(bf16), torch.ones(2)]).dtype == f32


# ----- autocast(): decorator, exceptions ---------------------------------------------------
def test_autocast_as_a_decorator_runs_every_call_under_the_policy():
    prec = Precision("bf16-mixed", device="cpu")

    @prec.autocast()
    def f(x, depth=0):
        inner = f(x, depth + 1) if depth < 2 else None  # nested calls: each its own context
        return (x @ x).dtype, torch.exp(x).dtype, torch.is_autocast_enabled("cpu"), inner

    x = torch.randn(3, 3)
    for _ in range(3):
        mm, exp, on, inner = f(x)
        assert (mm, exp, on) == (bf16, f32, True)
        assert inner[:3] == (bf16, f32, True) and inner[3][:3] == (bf16, f32, True)
        assert not torch.is_autocast_enabled("cpu")  # each call left the context
    ctx = prec.autocast()
    with ctx:
        with ctx:  # the same object entered twice (re-entrant)
            assert (x @ x).dtype == bf16
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("with_model", [False, True])
def test_exceptions_leave_autocast_unchanged(with_model):
    prec = Precision("bf16-mixed", device="cpu")
    if with_model:
        prec.setup(nn.Linear(2, 2))
    err = RuntimeError("expected dtype float but found BFloat16 somewhere")
    with pytest.raises(RuntimeError) as caught:
        with prec.autocast():
            raise err
    assert caught.value is err and type(caught.value) is RuntimeError
    for kind in (ValueError("x"), KeyError("k"), KeyboardInterrupt()):
        with pytest.raises(type(kind)) as caught:
            with prec.autocast():
                raise kind
        assert caught.value is kind
    assert not torch.is_autocast_enabled("cpu")


def test_a_dtype_clash_without_a_model_keeps_its_type_and_gains_a_note():
    prec = Precision("bf16-true")
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError) as caught:
        with prec.autocast():
            model(prec.convert_input(torch.ones(1, 2)))
    assert type(caught.value) is RuntimeError
    assert any("expected model = precision.setup(model" in n for n in caught.value.__notes__)


# ----- the cast cache ------------------------------------------------------------------------
class _CountCasts(TorchDispatchMode):
    def __init__(self, source):
        super().__init__()
        self.ptr, self.casts = source.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # a cast reaches a dispatch mode as _to_copy (to.dtype in inference mode, where it does not decompose)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) and args[0].data_ptr() == self.ptr:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_python_handled_ops_cast_a_weight_once_per_region():
    """mv and einsum are CUDA-lower ops that CPU autocast does not list (the emulation's
    Python kernels); a weight they share is cast once per outermost region, as torch does."""
    w = torch.randn(4, 4, requires_grad=True)
    v = torch.randn(4)
    prec = Precision("bf16-mixed", device="cpu")
    with prec.autocast():
        with _CountCasts(w) as count:
            a = torch.mv(w, v)
            b = torch.einsum("ij,j->i", w, v)
            c = torch.mv(w, v * 2)
        assert (a.dtype, b.dtype, c.dtype) == (bf16, bf16, bf16)
        assert count.casts == 1
        with prec.autocast():  # nested: the outer region's cache
            with _CountCasts(w) as count:
                torch.mv(w, v)
            assert count.casts == 0
    with prec.autocast():  # a new region casts again (the weight may have changed)
        with _CountCasts(w) as count:
            torch.mv(w, v)
        assert count.casts == 1
    torch.set_autocast_cache_enabled(False)
    try:
        with prec.autocast():
            with _CountCasts(w) as count:
                torch.mv(w, v), torch.mv(w, v)
            assert count.casts == 2
    finally:
        torch.set_autocast_cache_enabled(True)
    with torch.inference_mode(), prec.autocast():  # torch does not cache in inference mode
        with _CountCasts(w) as count:
            torch.mv(w, v), torch.mv(w, v)
        assert count.casts == 2
    # not cached: activations (non-leaves) and tensors that do not require grad
    x = torch.randn(4, 4)
    with prec.autocast():
        with _CountCasts(x) as count:
            torch.mv(x, v), torch.mv(x, v)
        assert count.casts == 2


def test_cached_cast_gradient_is_torchs():
    """One cast node per weight, as torch's cache gives: the gradients of its uses meet in
    bfloat16 and are cast to float32 once.  The reference writes that graph by hand."""
    torch.manual_seed(0)
    w = torch.randn(16, 16, requires_grad=True)
    v1, v2 = torch.randn(16), torch.randn(16)
    with Precision("bf16-mixed", device="cpu").autocast():
        loss = (torch.mv(w, v1).float().sum() + torch.einsum("ij,j->i", w, v2).float().square().sum())
    loss.backward()
    w2 = w.detach().clone().requires_grad_()
    wb = w2.to(bf16)
    ref = (torch.mv(wb, v1.to(bf16)).float().sum() + torch.einsum("ij,j->i", wb, v2.to(bf16)).float().square().sum())
    ref.backward()
    assert torch.equal(w.grad, w2.grad)


def test_cast_cache_holds_no_strong_reference_past_the_region():
    w = torch.randn(4, 4, requires_grad=True)
    with Precision("bf16-mixed", device="cpu").autocast():
        torch.mv(w, torch.randn(4))
    ref = weakref.ref(w)
    del w
    assert ref() is None


# ----- fabric.backward and deepcopy ---------------------------------------------------------
def test_fabric_backward_passes_positional_arguments():
    pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")
    from lightning.fabric import Fabric

    from dualprec_torch.fabric import DualprecPrecision

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision("16-mixed")])
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    out = model(torch.ones(4, 3)).float()  # not a scalar: backward needs the gradient
    gradient = torch.full_like(out, 2.0 ** -6)  # times the loss scale 2**16: fits float16
    fabric.backward(out, gradient)
    ref = nn.Linear(3, 2)
    ref.load_state_dict(model.module.state_dict())
    ref(torch.ones(4, 3)).backward(gradient.float())
    scale = fabric.strategy.precision.dualprec.scale
    assert scale == 2.0 ** 16
    assert torch.equal(model.module.weight.grad / scale, ref.weight.grad)


def test_deepcopy_of_a_model_with_an_override_runs_the_copys_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    model.add_module("head", nn.Linear(4, 2))
    prec = Precision("bf16-mixed,@head=32-true", device="cpu")
    model = prec.setup(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.weight.zero_()
        twin.head.bias.fill_(1.0)
    x = torch.randn(5, 3)
    with prec.autocast():
        out, out_twin = model(x), twin(x)
    assert out_twin.dtype == f32 and torch.equal(out_twin, torch.ones(5, 2))
    assert not torch.equal(out, torch.ones(5, 2))
    assert twin.head.forward.__self__ is twin.head
