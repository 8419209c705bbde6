"""Loss scaling: skipped steps on inf/NaN, scale trajectories equal GradScaler and the
reference state machine, clamps, several optimizers and param groups."""

import math

import pytest
import torch
from torch_support import assert_same_state, loss_fn, make_batches, make_model, run_by_hand, run_precision, setup_mlp

from dualprec import Policy
from dualprec.ref.loss_scale import loss_scale_init, loss_scale_update
from dualprec_torch import Precision

INF, NAN = float("inf"), float("nan")
# overflow at 1 and 2 (two backoffs), recovery, growth every 3 finite steps, NaN at 8
BAD = {1: INF, 2: NAN, 8: -INF}
FAST = "16-mixed,loss_scale=dynamic(init=2**10,interval=3)"


def ref_trajectory(policy: str, finite_flags):
    config = Policy.parse(policy).loss_scale
    state, out = loss_scale_init(config), []
    for finite in finite_flags:
        state = loss_scale_update(state, finite, config)
        out.append(float(state.scale))
    return out


@pytest.mark.parametrize("policy", [FAST, "mixed_float16", "16-mixed",
                                    "bf16-true,master=true,loss_scale=dynamic(init=2**8,interval=2)"])
@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_injected_overflow_matches_grad_scaler_and_reference(policy, kind):
    steps = 11
    log_p, log_h = [], []
    model_p, opt_p, prec = run_precision(policy, kind, steps, bad_steps=BAD, log=log_p)
    model_h, opt_h, _ = run_by_hand(policy, kind, steps, bad_steps=BAD, log=log_h)
    assert log_p == log_h
    assert_same_state(model_p, opt_p, model_h, opt_h)
    took = [t for t, _, _ in log_p]
    assert took == [i not in BAD for i in range(steps)]
    assert [s for _, s, _ in log_p] == ref_trajectory(policy, took)
    # Adam's step count counts only the steps taken
    assert all(int(s["step"]) == steps - len(BAD) for s in opt_p.state.values())


def test_skipped_step_changes_nothing():
    prec, model, opt = setup_mlp("16-mixed")
    (x, y), = make_batches("mlp", 1)

    def one_step(bad):
        opt.zero_grad()
        with prec.autocast():
            loss = loss_fn(model(prec.convert_input(x)), y)
        prec.backward(loss)
        if bad:
            next(model.parameters()).grad.view(-1)[3] = NAN
        return prec.step(opt)

    assert one_step(False)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {f: v.clone() for f, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    assert not one_step(True)
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)
    for k, s in opt.state_dict()["state"].items():
        for f, v in s.items():
            assert torch.equal(v, state[k][f]), (k, f)
    assert prec.scale == 2.0**15 and prec.loss_scale.counter == 0


def backward_with(prec, model, opt, x, y, finite: bool) -> None:
    """One forward/backward of the MLP under ``prec``; a non-finite gradient written in
    when ``finite`` is false (the optimizer step is the caller's)."""
    opt.zero_grad()
    with prec.autocast():
        loss = loss_fn(model(prec.convert_input(x)), y)
    prec.backward(loss)
    if not finite:
        next(model.parameters()).grad.view(-1)[0] = INF


def test_min_max_clamps_follow_reference():
    # backoff floors at min, growth caps at max; GradScaler has no clamp, the reference does
    policy = "16-mixed,loss_scale=dynamic(init=8,interval=1,min=4,max=32)"
    prec, model, opt = setup_mlp(policy)
    flags = [False, False, False, True, True, True, True, False, True]
    seen = []
    for i, (x, y) in enumerate(make_batches("mlp", len(flags))):
        backward_with(prec, model, opt, x, y, flags[i])
        assert prec.step(opt) == flags[i]
        prec.update()
        seen.append(prec.scale)
    ref = ref_trajectory(policy, flags)
    assert seen == ref
    assert min(seen) == 4.0 and max(seen) == 32.0  # the clamps were reached


def test_growth_that_overflows_float32_keeps_the_scale():
    policy = "16-mixed,loss_scale=dynamic(init=2**100,growth=2**20,interval=1)"
    prec = Precision(policy)
    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = prec.setup(model, opt)
    (x, y), = make_batches("mlp", 1)
    for _ in range(3):  # 2**100 -> 2**120 -> (2**140 is inf) 2**120
        opt.zero_grad()
        with prec.autocast():
            loss = loss_fn(model(prec.convert_input(x)), y) * 0.0
        prec.backward(loss)
        prec.step(opt)
    assert prec.scale == 2.0**120 == ref_trajectory(policy, [True, True, True])[-1]


def test_static_scale_skips_nonfinite_and_never_changes():
    prec, model, opt = setup_mlp("bf16-mixed,loss_scale=static(128)")
    grads = []
    for i, (x, y) in enumerate(make_batches("mlp", 3)):
        opt.zero_grad()
        with prec.autocast():
            loss = loss_fn(model(prec.convert_input(x)), y)
        prec.backward(loss)
        grads.append(next(model.parameters()).grad.clone())
        if i == 1:
            next(model.parameters()).grad.view(-1)[0] = INF
        assert prec.step(opt) == (i != 1)
        assert prec.scale == 128.0
    # the gradients were scaled by exactly 128 and unscaled by exactly 1/128
    plain = make_model("mlp")
    with prec.autocast():
        x, y = make_batches("mlp", 1)[0]
        loss_fn(plain(prec.convert_input(x)), y).mul(128.0).backward()
    assert torch.equal(next(plain.parameters()).grad, grads[0])


def _two_optimizer_setup(prec_or_none):
    torch.manual_seed(0)
    model = make_model("block")
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    head = list(model.head.parameters())
    # two param groups in the first optimizer, a different optimizer for the head
    opt_a = torch.optim.AdamW([{"params": body[:4]}, {"params": body[4:], "lr": 3e-3}], lr=1e-2, eps=1e-4)
    opt_b = torch.optim.SGD(head, lr=0.1, momentum=0.9)
    if prec_or_none is not None:
        model, opt_a, opt_b = prec_or_none.setup(model, opt_a, opt_b)
    return model, opt_a, opt_b


@pytest.mark.parametrize("explicit_update", [True, False])
def test_several_optimizers_match_grad_scaler(explicit_update):
    policy = "16-mixed,loss_scale=dynamic(init=2**12,interval=2)"
    steps, bad_head = 7, {2, 5}
    prec = Precision(policy)
    model_p, a_p, b_p = _two_optimizer_setup(prec)
    model_h, a_h, b_h = _two_optimizer_setup(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    taken = []
    for i, (x, y) in enumerate(make_batches("block", steps)):
        for opt in (a_p, b_p, a_h, b_h):
            opt.zero_grad()
        with prec.autocast():
            loss_p = loss_fn(model_p(prec.convert_input(x)), y)
        with torch.autocast("cpu", dtype=torch.float16):
            loss_h = loss_fn(model_h(x.half(), explicit_fp32=True), y, explicit_fp32=True)
        prec.backward(loss_p)
        scaler.scale(loss_h).backward()
        if i in bad_head:  # only the head's optimizer sees the overflow
            model_p.head.weight.grad.view(-1)[0] = INF
            model_h.head.weight.grad.view(-1)[0] = INF
        prec.unscale_(a_p)  # clipping path for one of them
        scaler.unscale_(a_h)
        torch.nn.utils.clip_grad_norm_(prec.master_params(a_p), 1.0)
        torch.nn.utils.clip_grad_norm_([p for g in a_h.param_groups for p in g["params"]], 1.0)
        taken.append((prec.step(a_p), prec.step(b_p)))
        scaler.step(a_h)
        scaler.step(b_h)
        if explicit_update:
            prec.update()
        scaler.update()
        assert prec.scale == scaler.get_scale()
    assert taken == [(True, i not in bad_head) for i in range(steps)]
    assert_same_state(model_p, a_p, model_h, a_h)
    assert_same_state(model_p, b_p, model_h, b_h)


def test_fp16_gradients_are_refused_with_the_fix():
    prec, model, opt = setup_mlp("16-mixed")
    model.half()  # the user undid the float32 params
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        loss = loss_fn(model(prec.convert_input(x)), y)
    prec.backward(loss)
    with pytest.raises(ValueError, match="float16 gradients.*fc1.weight.*master=true"):
        prec.step(opt)


def test_loss_scale_state_has_the_reference_fields_as_tensors():
    from dualprec_torch import LossScaleState

    prec = Precision("mixed_float16")
    state = prec.loss_scale
    assert isinstance(state, LossScaleState) and state._fields == ("scale", "counter")
    assert state.scale.dtype == torch.float32 and state.counter.dtype == torch.int32
    assert state.scale.item() == 2.0**15 and state.counter.item() == 0
    assert Precision("bf16-mixed").scale == 1.0
    assert math.isclose(Precision("bf16-mixed,loss_scale=static(64)").scale, 64.0)


def test_reading_the_scale_changes_nothing_and_names_the_next_iterations_scale():
    """`scale`, `loss_scale` and `last_step` are reads: the pending update is worked out on
    copies (the scaler's tensors stay as they were); each read gives the reference's scale
    after this step's update, which the next backward then applies."""
    policy = "16-mixed,loss_scale=dynamic(init=2**10,interval=2)"
    prec, model, opt = setup_mlp(policy)
    flags = [True, True, False, True, True, True]
    for i, (x, y) in enumerate(make_batches("mlp", len(flags))):
        backward_with(prec, model, opt, x, y, flags[i])
        prec.step(opt)
        before = (prec._scaler._scale.clone(), prec._scaler._counter.clone())
        seen = [prec.scale, prec.scale, prec.loss_scale, prec.last_step().scale]
        assert torch.equal(prec._scaler._scale, before[0]) and torch.equal(prec._scaler._counter, before[1])
        expect = ref_trajectory(policy, flags[:i + 1])[-1]
        assert seen[0] == seen[1] == seen[2].scale.item() == seen[3] == expect, (i, seen, expect)
    prec.update()
    assert prec._scaler.scale == expect  # the update then applied is the one the reads reported
