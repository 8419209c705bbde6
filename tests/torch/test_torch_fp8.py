"""The native FP8 engine: scales, histories and fp8 codes equal dualprec.ref.fp8 bit for bit,
GEMMs equal the dequantized reference product within float32 rounding, current scaling
equals torchao's Float8Linear, and the FP8 state survives a save and resume."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dualprec import FP8Recipe, Policy, PolicyError
from dualprec.ref import fp8 as ref
from dualprec.ref.casts import nan_equal
from dualprec_torch import Precision, fp8
from dualprec_torch.fp8 import FP8Linear

RECIPES = [FP8Recipe(history_len=16),
           FP8Recipe(history_len=8, margin=2, amax_algo="most_recent", format="e4m3"),
           FP8Recipe()]


def _np(t):
    return t.detach().cpu().numpy()


def _codes(q: torch.Tensor) -> np.ndarray:
    """fp8 tensor -> ml_dtypes array with the same bits."""
    fmt = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}[q.dtype]
    from dualprec.ref.casts import dtype_of
    return _np(q.view(torch.uint8)).view(dtype_of(fmt))


def _step_tensors(step, gen):
    """Inputs and output gradients over many magnitudes, with an all-zero input (amax 0), an
    infinite input and a NaN gradient (non-finite amaxes) among them."""
    x = torch.randn(24, 48, generator=gen) * float(2.0 ** ((step % 7) * 3 - 9))
    g = torch.randn(24, 32, generator=gen) * float(2.0 ** ((step % 5) * 4 - 8))
    if step == 3:
        x = torch.zeros_like(x)
    if step == 6:
        x[2, 5] = float("inf")
    if step == 9:
        g[0, 0] = float("nan")
    if step == 11:
        g = torch.zeros_like(g)
    return x, g


def _layer(recipe, seed=0, **kw):
    torch.manual_seed(seed)
    return FP8Linear(48, 32, recipe=recipe, **kw)


def _assert_state_equal(layer, state, where):
    got = fp8.state_tensors(layer)
    for role in ref.ROLES:
        assert nan_equal(_np(got[f"fp8.{role}.scale"]), np.asarray(state[role].scale, np.float32)), (where, role)
        assert nan_equal(_np(got[f"fp8.{role}.amax_history"]), state[role].amax_history), (where, role)


@pytest.mark.parametrize("recipe", RECIPES, ids=["hist16", "e4m3-recent-margin2", "defaults"])
def test_delayed_scales_and_histories_equal_the_reference(recipe):
    layer, state, gen = _layer(recipe), ref.fp8_delayed_init(recipe), torch.Generator().manual_seed(1)
    steps = 30 if recipe.history_len < 1024 else 12
    for step in range(steps):
        x, g = _step_tensors(step, gen)
        with torch.no_grad():  # the weight changes between steps, as training would change it
            layer.weight.mul_(1.5 if step % 2 else 0.5)
        layer(x.requires_grad_()).backward(g)
        *_, state = ref.fp8_gemm_qdq(_np(x), _np(layer.weight), state, recipe, grad_output=_np(g))
        _assert_state_equal(layer, state, f"step {step}")
    scales = [float(state[r].scale) for r in ref.ROLES]
    assert len(set(scales)) == 3 and 1.0 not in scales  # the test moved every scale


def _reuse_step(layer, xs, gs, spy=None):
    """One training step calling ``layer`` once per input, one backward for all calls."""
    xs = [x.clone().requires_grad_() for x in xs]
    ys = [layer(x) for x in xs]
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    return xs


def _ref_reuse_step(state, xs, w, gs, recipe):
    """The JAX rule on the reference: per role, the max of the calls' amaxes, one update."""
    amaxes = {"input": np.max([ref.amax(_np(x)) for x in xs]), "weight": ref.amax(w),
              "grad_output": np.max([ref.amax(_np(g)) for g in gs])}
    for role in ref.ROLES:
        state = ref.fp8_delayed_update(state, role, amaxes[role], recipe)
    return state


@pytest.mark.parametrize("recipe", RECIPES[:2], ids=["hist16", "e4m3-recent-margin2"])
def test_reused_layer_quantizes_with_one_scale_and_rolls_once_per_step(monkeypatch, recipe):
    """A layer called twice before its backward: both calls quantize with the step's scales, the
    amaxes combine with max, the history rolls once (the JAX engine's rule); a zero input, an
    infinite input and a NaN gradient in one of the calls among the steps."""
    layer, state, gen = _layer(recipe), ref.fp8_delayed_init(recipe), torch.Generator().manual_seed(11)
    for step in range(10):
        (x1, g1), (x2, g2) = _step_tensors(step, gen), _step_tensors(step + 3, gen)
        spy = _Spy(monkeypatch)
        _reuse_step(layer, [x1, x2], [g1, g2])
        forward = [c for c in spy.calls if c[0].shape == (24, 48)]  # the two forward GEMMs
        backward = [c for c in spy.calls if c[0].shape == (24, 32)]  # dX of each call
        assert len(forward) == len(backward) == 2
        for inv, role in [(c[2], "input") for c in forward] + [(c[3], "weight") for c in forward] + \
                [(c[2], "grad_output") for c in backward]:
            assert _np(inv) == np.float32(1.0) / state[role].scale, (step, role)
        state = _ref_reuse_step(state, [x1, x2], _np(layer.weight), [g1, g2], recipe)
        _assert_state_equal(layer, state, f"step {step}")


def test_each_backward_ends_a_step_gradient_accumulation_included():
    """Micro-batches with a backward each are a step each (JAX: one gradient evaluation per
    micro-batch); forwards without a backward (grad mode off, an output never differentiated)
    record nothing; a model reloaded mid-step starts the next step from the loaded scales."""
    recipe = FP8Recipe(history_len=4)
    layer, state, gen = _layer(recipe), ref.fp8_delayed_init(recipe), torch.Generator().manual_seed(12)
    for step in range(3):
        for micro in range(2):  # accumulation: .grad sums, the recipe steps per backward
            x, g = _step_tensors(2 * step + micro, gen)
            with torch.no_grad():
                layer(x * 1e4)  # grad mode off: quantizes, records nothing
            layer(x * 1e5)  # never differentiated: records nothing
            _reuse_step(layer, [x], [g])
            state = _ref_reuse_step(state, [x], _np(layer.weight), [g], recipe)
            _assert_state_equal(layer, state, f"step {step}.{micro}")
    saved = fp8.state_tensors(layer)
    x, g = _step_tensors(7, gen)
    y = layer(x.clone().requires_grad_())  # a step begins ...
    fp8.load_state_tensors(layer, saved)  # ... and a load ends it
    _reuse_step(layer, [x], [g])
    _assert_state_equal(layer, _ref_reuse_step(state, [x], _np(layer.weight), [g], recipe), "after load")
    del y


def test_a_call_with_nothing_to_differentiate_records_in_its_forward():
    """A frozen layer on an input without gradient has no backward: each call records its
    input and weight amaxes and is a step of its own (grad mode on; off records nothing)."""
    recipe = FP8Recipe(history_len=4)
    layer, state, gen = _layer(recipe), ref.fp8_delayed_init(recipe), torch.Generator().manual_seed(14)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    for step in range(3):
        x, _ = _step_tensors(step, gen)
        assert not layer(x).requires_grad
        with torch.no_grad():
            layer(x * 1e3)
        for role, a in (("input", ref.amax(_np(x))), ("weight", ref.amax(_np(layer.weight)))):
            state = ref.fp8_delayed_update(state, role, a, recipe)
        _assert_state_equal(layer, state, f"step {step}")


def test_checkpoint_recompute_of_a_reused_layer_changes_nothing():
    """torch.utils.checkpoint recomputes the calls inside the backward: same scales, same state."""
    from torch.utils.checkpoint import checkpoint

    recipe = FP8Recipe(history_len=4)
    plain, ckpt = _layer(recipe), _layer(recipe)
    gen = torch.Generator().manual_seed(13)
    for step in range(3):
        (x1, g1), (x2, g2) = _step_tensors(step, gen), _step_tensors(step + 2, gen)
        grads = []
        for layer, wrap in ((plain, False), (ckpt, True)):
            xs = [x.clone().requires_grad_() for x in (x1, x2)]
            ys = [checkpoint(layer, x, use_reentrant=False) if wrap else layer(x) for x in xs]
            ((ys[0] * g1).sum() + (ys[1] * g2).sum()).backward()
            grads.append([x.grad for x in xs])
        a, b = fp8.state_tensors(plain), fp8.state_tensors(ckpt)
        assert all(nan_equal(_np(a[k]), _np(b[k])) for k in a), step
        assert all(torch.equal(p, q) for p, q in zip(*grads)), step


class _Spy:
    """Records every FP8 GEMM's operands (fp8_gemm is looked up at call time)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = fp8.fp8_gemm

        def spy(a, b_t, inv_a, inv_b, out_dtype, **kw):
            self.calls.append((a, b_t, inv_a, inv_b))
            return real(a, b_t, inv_a, inv_b, out_dtype, **kw)

        monkeypatch.setattr(fp8, "fp8_gemm", spy)


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fp8_codes_of_each_operand_equal_the_reference(monkeypatch, fmt):
    recipe = FP8Recipe(history_len=4, format=fmt)
    layer, state, gen = _layer(recipe), ref.fp8_delayed_init(recipe), torch.Generator().manual_seed(2)
    for step in range(3):
        spy = _Spy(monkeypatch)
        x, g = _step_tensors(step, gen)
        x[0, :4] = torch.tensor([1e6, -1e6, 3e-9, -0.0])  # saturating, subnormal, signed zero
        layer(x.requires_grad_()).backward(g)
        before = state
        *_, state = ref.fp8_gemm_qdq(_np(x), _np(layer.weight), state, recipe, grad_output=_np(g))
        (xq, wq, inv_x, inv_w), (gq, wq_t, inv_g, _), (gq_t, xq_t, _, _) = spy.calls
        for role, got, t in (("input", xq, x), ("weight", wq, layer.weight), ("grad_output", gq, g)):
            want = ref.quantize_fp8(_np(t), before[role].scale, ref.role_format(role, recipe))
            assert nan_equal(_codes(got), want), (step, role)
        for a, b in ((wq_t, wq.t()), (gq_t, gq.t()), (xq_t, xq.t())):
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        for inv, role in ((inv_x, "input"), (inv_w, "weight"), (inv_g, "grad_output")):
            assert _np(inv) == np.float32(1.0) / before[role].scale


@pytest.mark.parametrize("scaling", ["delayed", "current"])
def test_gemm_outputs_match_the_dequantized_reference_product(scaling):
    recipe = FP8Recipe(scaling) if scaling == "current" else FP8Recipe(history_len=4)
    layer, state = _layer(recipe), ref.fp8_delayed_init(recipe)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(24, 48, generator=gen, requires_grad=True)
        g = torch.randn(24, 32, generator=gen)
        layer.zero_grad()
        y = layer(x)
        y.backward(g)
        xr, wr, gr, state = ref.fp8_gemm_qdq(_np(x), _np(layer.weight), state, recipe, grad_output=_np(g))
        want = {"y": xr @ wr.T + _np(layer.bias), "dx": gr @ wr, "dw": gr.T @ xr}
        got = {"y": _np(y), "dx": _np(x.grad), "dw": _np(layer.weight.grad)}
        for name in want:
            scale = np.abs(want[name]).max()
            assert np.abs(got[name] - want[name]).max() <= 1e-5 * scale, (step, name)
    assert y.dtype == x.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert torch.allclose(layer.bias.grad, g.sum(0))


def test_compute_dtype_follows_autocast_and_gradients_their_tensors():
    layer = _layer(FP8Recipe("current"))
    x = torch.randn(8, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert _layer(FP8Recipe("current"), out_dtype=torch.float16)(x).dtype == torch.float16


def test_current_scaling_matches_torchao_float8linear(monkeypatch):
    """torchao 0.18's Float8Linear (emulate=True, tensorwise): the same scales and fp8 codes
    for input, weight (e4m3) and output gradient (e5m2) of a 64 x 128 linear."""
    pytest.importorskip("torchao")
    import torchao.float8.float8_linear as ao_linear
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    captured = []
    real = ao_linear.hp_tensor_to_float8_dynamic

    def spy(hp, dtype, *args, **kwargs):
        out = real(hp, dtype, *args, **kwargs)
        captured.append((out._data, out._scale))
        return out

    monkeypatch.setattr(ao_linear, "hp_tensor_to_float8_dynamic", spy)
    torch.manual_seed(4)
    x = torch.randn(64, 128) * 3.0
    g = torch.randn(64, 128) * 1e-3
    base = nn.Linear(128, 128, bias=False)
    ao = convert_to_float8_training(nn.Sequential(base), config=Float8LinearConfig(emulate=True))
    ao(x.clone().requires_grad_()).backward(g)
    ao_x, ao_w, ao_g = captured[0], captured[1], captured[2]

    ours = []
    real_q = fp8._quantize

    def spy_q(t, scale, fmt):
        q = real_q(t, scale, fmt)
        ours.append((q, scale))
        return q

    monkeypatch.setattr(fp8, "_quantize", spy_q)
    layer = FP8Linear.from_linear(nn.Linear(128, 128, bias=False), FP8Recipe("current"))
    layer.weight.data.copy_(base.weight.data)
    layer(x.clone().requires_grad_()).backward(g)
    (our_x, sx), (our_w, sw), (our_g, sg) = ours
    for (ao_q, ao_s), q, s, transposed in ((ao_x, our_x, sx, False), (ao_w, our_w, sw, True),
                                          (ao_g, our_g, sg, False)):
        ao_q = ao_q.t() if transposed else ao_q  # torchao casts weight.t()
        assert ao_q.dtype == q.dtype
        assert torch.equal(ao_q.contiguous().view(torch.uint8), q.view(torch.uint8))
        assert ao_s.dtype == s.dtype == torch.float32 and torch.equal(ao_s.reshape(()), s.reshape(()))
    assert our_g.dtype == torch.float8_e5m2 and our_x.dtype == torch.float8_e4m3fn


def test_current_scaling_of_zero_and_nonfinite_tensors_is_the_reference_scale(monkeypatch):
    seen = []
    real_q = fp8._quantize
    monkeypatch.setattr(fp8, "_quantize", lambda t, s, f: seen.append(s) or real_q(t, s, f))
    layer = _layer(FP8Recipe("current"))
    x = torch.zeros(4, 48)
    x2 = torch.randn(4, 48)
    x2[0, 0] = float("inf")
    for t in (x, x2):
        seen.clear()
        layer(t)
        assert _np(seen[0]) == ref.fp8_current_scale(_np(t), "float8_e4m3fn")


@pytest.mark.parametrize("shape", [(30, 50, 20), (17, 33, 9), (32, 64, 48)])
def test_padded_and_emulated_gemms_equal_the_plain_one(shape):
    m, k, n = shape
    a = (torch.randn(m, k) * 50).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k) * 50).to(torch.float8_e4m3fn)
    ia, ib = torch.tensor(0.25), torch.tensor(0.125)
    plain = fp8.fp8_gemm(a, b, ia, ib, torch.float32, pad=False)
    padded = fp8.fp8_gemm(a, b, ia, ib, torch.float32, pad=True)
    emulated = fp8.fp8_gemm(a, b, ia, ib, torch.float32, emulate=True)
    want = (a.double() @ b.double().t()) * 0.25 * 0.125
    assert padded.shape == plain.shape == (m, n)
    for got in (plain, padded, emulated):
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_odd_dims_through_a_padded_layer():
    recipe = FP8Recipe(history_len=4)
    torch.manual_seed(5)
    a, b = FP8Linear(33, 9, recipe=recipe, pad=False), FP8Linear(33, 9, recipe=recipe, pad=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 7, 33)
    for layer in (a, b):
        layer(x.clone().requires_grad_()).sum().backward()
    assert torch.allclose(a(x), b(x), rtol=1e-6, atol=1e-6)
    assert torch.allclose(a.weight.grad, b.weight.grad, rtol=1e-6, atol=1e-6)
    assert a(x).shape == (3, 7, 9)


# --------------------------------------------------------------------------- conversion


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.fc2(self.norm(torch.relu(self.fc1(x)))))


def test_convert_module_follows_policy_overrides_and_filters():
    model = Net()
    params = list(model.parameters())
    fp8.convert_module(model, Policy.parse("bf16-mixed,fp8=delayed(engine=native),@head=(fp8=none)"),
                       module_filter_fn=lambda m, path: path != "fc2")
    assert type(model.fc1) is FP8Linear and type(model.fc2) is nn.Linear and type(model.head) is nn.Linear
    assert list(model.parameters())[: len(params)] == params  # same Parameter objects
    with pytest.warns(UserWarning, match="nothing was converted"):
        fp8.convert_module(Net(), Policy.parse("bf16-mixed,fp8=current"), module_filter_fn=lambda m, p: False)
    assert fp8.convert_module(Net(), Policy.parse("bf16-mixed")).fc1.__class__ is nn.Linear


    class Custom(nn.Linear):
        pass

    model = Net()
    model.head = Custom(32, 8)
    with pytest.warns(UserWarning, match=r"Linear subclass.*head"):
        fp8.convert_module(model, Policy.parse("bf16-mixed,fp8=current(engine=native)"))
    assert type(model.head) is Custom and type(model.fc1) is FP8Linear


def test_state_buffers_survive_dtype_casts_and_precision_setup():
    model = Net()
    prec = Precision("params=bfloat16,compute=bfloat16,output=float32,fp8=delayed(history=8,engine=native)")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = prec.setup(model, opt)
    assert model.fc1.weight.dtype == torch.bfloat16 and type(model.head) is FP8Linear
    for _ in range(2):
        with prec.autocast():
            loss = model(prec.convert_input(torch.randn(8, 16))).float().pow(2).mean()
        prec.backward(loss)
        prec.step(opt)
    before = fp8.state_tensors(model)
    model.to(torch.float16)
    Precision("bf16-true,fp8=delayed(history=8,engine=native)").setup(model)  # set up again
    after = fp8.state_tensors(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert before["fp8.fc1.input.scale"] != 1.0 and after["fp8.fc1.input.scale"].dtype == torch.float32


# --------------------------------------------------------------------------- state


def _train(model, steps, gen):
    for _ in range(steps):
        model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()


def test_state_survives_save_and_resume():
    policy = Policy.parse("32-true,fp8=delayed(history=8,engine=native)")
    torch.manual_seed(6)
    run = fp8.convert_module(Net(), policy)
    gen = torch.Generator().manual_seed(7)
    _train(run, 3, gen)
    saved = {k: _np(v) for k, v in fp8.state_tensors(run).items()}  # numpy, as a checkpoint holds them
    weights = {k: v.clone() for k, v in run.state_dict().items()}
    _train(run, 2, gen)

    torch.manual_seed(99)
    resumed = fp8.convert_module(Net(), policy)
    resumed.load_state_dict(weights)  # the model's own state dict carries the FP8 buffers too
    fresh = fp8.convert_module(Net(), policy)
    fresh.load_state_dict({k: v for k, v in weights.items() if "fp8_" not in k}, strict=False)
    fp8.load_state_tensors(fresh, saved)
    for model in (resumed, fresh):  # replay the two batches the run took after the save
        g = torch.Generator().manual_seed(7)
        for _ in range(3):
            torch.randn(8, 16, generator=g)
        _train(model, 2, g)
    want = fp8.state_tensors(run)
    for model in (resumed, fresh):
        got = fp8.state_tensors(model)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fp8_state_into_a_non_fp8_model_and_back_is_an_error():
    policy = Policy.parse("32-true,fp8=delayed(history=8,engine=native)")
    fp8_model, plain = fp8.convert_module(Net(), policy), Net()
    _train(fp8_model, 1, torch.Generator().manual_seed(0))
    state = fp8.state_tensors(fp8_model)
    with pytest.raises(PolicyError, match="no FP8 .*written by an FP8 run"):
        fp8.load_state_tensors(plain, state)
    with pytest.raises(PolicyError, match="no FP8 state.*without FP8"):
        fp8.load_state_tensors(fp8.convert_module(Net(), policy), {"loss_scale.scale": np.float32(1)})
    with pytest.raises(RuntimeError, match="Missing key"):
        fp8.convert_module(Net(), policy).load_state_dict(plain.state_dict())
    short = fp8.convert_module(Net(), Policy.parse("32-true,fp8=delayed(history=4,engine=native)"))
    with pytest.raises(PolicyError, match="keeps 4"):
        fp8.load_state_tensors(short, state)
    partial = fp8.convert_module(Net(), policy)
    fp8.load_state_tensors(partial, {k: v for k, v in state.items() if ".fc1." in k}, strict=False)
    got = fp8.state_tensors(partial)
    assert torch.equal(got["fp8.fc1.input.scale"], state["fp8.fc1.input.scale"])
    assert got["fp8.fc2.input.scale"] == 1.0  # left fresh, by explicit choice


def test_eval_mode_quantizes_without_recording():
    layer = _layer(FP8Recipe(history_len=4))
    layer(torch.randn(4, 48)).sum().backward()
    before = fp8.state_tensors(layer)
    layer.eval()
    layer(torch.randn(4, 48) * 100)
    after = fp8.state_tensors(layer)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_torch_compile_gives_the_eager_state_and_outputs():
    recipe = FP8Recipe(history_len=8)
    eager, compiled = _layer(recipe), _layer(recipe)
    fn = torch.compile(compiled)
    gen = torch.Generator().manual_seed(8)
    for step in range(3):
        x, g = _step_tensors(step + 4, gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ys = [m(x.clone().requires_grad_()) for m in (eager, fn)]
        for y in ys:
            y.backward(g)
        assert torch.allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5)
    a, b = fp8.state_tensors(eager), fp8.state_tensors(compiled)
    assert all(nan_equal(_np(a[k]), _np(b[k])) for k in a)
    assert torch.allclose(eager.weight.grad, compiled.weight.grad, rtol=1e-5, atol=1e-5)


def test_precision_checkpoint_carries_fp8_state(tmp_path):
    from dualprec import checkpoint

    policy = "bf16-mixed,fp8=delayed(history=8,engine=native)"

    def run(steps, prec, model, opt, gen):
        for _ in range(steps):
            opt.zero_grad()
            with prec.autocast():
                loss = model(prec.convert_input(torch.randn(8, 16, generator=gen))).float().pow(2).mean()
            prec.backward(loss)
            prec.step(opt)

    def build(seed):
        torch.manual_seed(seed)
        prec, model = Precision(policy), Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model, opt = prec.setup(model, opt)
        return prec, model, opt

    prec, model, opt = build(0)
    gen = torch.Generator().manual_seed(1)
    run(3, prec, model, opt, gen)
    checkpoint.save_state(tmp_path / "precision.dpck", prec.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items() if "fp8_" not in k}
    run(2, prec, model, opt, gen)

    prec2, model2, opt2 = build(5)
    model2.load_state_dict(weights, strict=False)
    prec2.load_state_dict(checkpoint.load_state(tmp_path / "precision.dpck"))
    gen2 = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn(8, 16, generator=gen2)
    run(2, prec2, model2, opt2, gen2)
    want, got = fp8.state_tensors(model), fp8.state_tensors(model2)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_precision_refuses_fp8_state_in_a_plain_run_and_the_reverse():
    fp8_policy = "bf16-mixed,fp8=delayed(history=8,engine=native)"
    runs = {}
    for policy in (fp8_policy, "bf16-mixed"):
        prec = Precision(policy)
        model = prec.setup(Net())
        model(torch.randn(4, 16)).float().sum().backward()
        runs[policy] = prec, model
    (fp8_prec, fp8_model), (plain_prec, _) = runs[fp8_policy], runs["bf16-mixed"]
    fp8_state, plain_state = fp8_prec.state_dict(), plain_prec.state_dict()
    for prec, state in ((plain_prec, fp8_state), (fp8_prec, plain_state)):
        with pytest.raises(PolicyError, match="written under policy"):
            prec.load_state_dict(state)
    with pytest.raises(PolicyError, match="no FP8 .*layers.*extensions"):
        plain_prec.load_state_dict(fp8_state, strict=False)
    before = fp8.state_tensors(fp8_model)
    fp8_prec.load_state_dict(plain_state, strict=False)  # loose: the FP8 layers keep their own state
    after = fp8.state_tensors(fp8_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_scale_division_is_the_correctly_rounded_float32_quotient():
    """The scale is computed through float64 (compiled float32 division may be approximate);
    the result must still be numpy's float32 quotient, bit for bit, at every magnitude."""
    rng = np.random.default_rng(0)
    amax = np.abs(rng.standard_normal(100_000).astype(np.float32)
                  * np.float32(10.0) ** rng.integers(-44, 38, 100_000).astype(np.float32))
    amax = amax[np.isfinite(amax) & (amax > 0)]
    with np.errstate(over="ignore"):
        want = np.float32(np.float32(448.0) / amax) / np.float32(4.0)
    got = fp8._scale_from_amax(torch.from_numpy(amax), torch.ones(len(amax)), 448.0, 2).numpy()
    assert np.array_equal(want.view(np.uint32), got.view(np.uint32))


# --------------------------------------------------------------------------- CUDA (device script)

_NO_FP8_GPU = not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(_NO_FP8_GPU, reason="needs a CUDA GPU with compute capability >= 8.9")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", [(48, 32, 24), (33, 9, 7)], ids=["aligned", "padded"])
def test_gpu_state_codes_and_gemms_equal_the_reference(compiled, shape):
    """On a GPU: torch._scaled_mm with the layouts and padding CUDA needs, scales and histories
    bit for bit (eager and compiled), GEMMs within float32 rounding of the reference."""
    k, n, m = shape
    recipe = FP8Recipe(history_len=8)
    torch.manual_seed(0)
    layer = FP8Linear(k, n, recipe=recipe, device="cuda")
    run = torch.compile(layer) if compiled else layer
    state, gen = ref.fp8_delayed_init(recipe), torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(m, k, generator=gen) * float(4.0 ** step)
        g = torch.randn(m, n, generator=gen)
        if step == 2:
            x = torch.zeros_like(x)
        layer.zero_grad()
        xc = x.cuda().requires_grad_()
        y = run(xc)
        y.backward(g.cuda())
        xr, wr, gr, state = ref.fp8_gemm_qdq(_np(x), _np(layer.weight), state, recipe, grad_output=_np(g))
        got = {k2: _np(v) for k2, v in fp8.state_tensors(layer).items()}
        for role in ref.ROLES:
            assert nan_equal(got[f"fp8.{role}.scale"], np.asarray(state[role].scale, np.float32)), (step, role)
            assert nan_equal(got[f"fp8.{role}.amax_history"], state[role].amax_history), (step, role)
        for name, have, want in (("y", y, xr @ wr.T + _np(layer.bias)), ("dx", xc.grad, gr @ wr),
                                 ("dw", layer.weight.grad, gr.T @ xr)):
            assert np.abs(_np(have) - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-30), (step, name)
