"""Mistakes that used to pass silently in a torch training loop: each gets an error (the
intent is unambiguous) or a warning given once (it may be deliberate), naming the fix."""

import warnings

import pytest
import torch
from torch import nn
from torch_support import loss_fn, make_batches, setup_mlp

from dualprec import PolicyError
from dualprec.errors import QuantizationError
from dualprec_torch import Precision
from dualprec_torch.precision import SKIP_WARNING_STREAK


def _loss(prec, model, scale=1.0):
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        return loss_fn(model(prec.convert_input(x)), y) * scale


@pytest.mark.parametrize("policy, why", [("16-mixed", r"still multiplied by the loss scale \(65536\)"),
                                         ("bf16-true,master=true", "master weights have no gradients")])
def test_optimizer_step_instead_of_precision_step_is_an_error(policy, why):
    prec, model, opt = setup_mlp(policy)
    before = [p.detach().clone() for p in model.parameters()]
    prec.backward(_loss(prec, model))
    with pytest.raises(RuntimeError, match=rf"optimizer.step\(\) called directly under .*{why}.*precision.step\(optimizer\)"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing moved
    assert prec.step(opt)  # the right call still works afterwards


def test_optimizer_step_is_fine_where_it_is_the_same_step():
    prec, model, opt = setup_mlp("bf16-mixed")  # no loss scale, no master weights
    prec.backward(_loss(prec, model))
    opt.step()


@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed", "32-true", "bf16-true,master=true"])
def test_precision_step_twice_per_backward_is_an_error(policy):
    prec, model, opt = setup_mlp(policy)
    prec.backward(_loss(prec, model))
    assert prec.step(opt)
    after_one = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step\(\) twice for this optimizer with no backward in between"):
        prec.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(after_one, model.parameters()))
    # a new backward (with or without zero_grad) makes the next step legitimate
    prec.backward(_loss(prec, model))
    assert prec.step(opt)
    opt.zero_grad()
    prec.backward(_loss(prec, model))
    assert prec.step(opt)


def test_forward_outside_autocast_under_a_mixed_policy_warns_once():
    prec, model, opt = setup_mlp("bf16-mixed")
    x = make_batches("mlp", 1)[0][0]
    with pytest.warns(UserWarning, match=r"ran outside precision.autocast\(\).*float32, not bfloat16.*"
                                         r"with precision.autocast\(\)"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once
        with prec.autocast():
            model(x)


def test_forward_without_autocast_is_silent_under_true_policies():
    prec, model, opt = setup_mlp("bf16-true")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(prec.convert_input(make_batches("mlp", 1)[0][0]))


def test_consecutive_skipped_steps_warn_once_with_the_likely_causes():
    prec, model, opt = setup_mlp("16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(SKIP_WARNING_STREAK + 5):
            opt.zero_grad()
            prec.backward(_loss(prec, model, scale=float("nan")))  # NaN: no scale fixes it
            assert not prec.step(opt)
            prec.update()
            if i == SKIP_WARNING_STREAK - 2:
                assert not [w for w in caught if "consecutive" in str(w.message)]
    skips = [str(w.message) for w in caught if "consecutive steps skipped" in str(w.message)]
    assert len(skips) == 1
    assert f"{SKIP_WARNING_STREAK} consecutive steps skipped" in skips[0]
    assert "loss scale fell to 0.00195312" in skips[0]  # 65536 * 0.5**25
    assert "NaN" in skips[0] and "last_step" in skips[0]


def test_an_applied_step_resets_the_skip_streak():
    prec, model, opt = setup_mlp("16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2 * SKIP_WARNING_STREAK - 2):
            opt.zero_grad()
            bad = i != SKIP_WARNING_STREAK - 1  # one good step in the middle
            prec.backward(_loss(prec, model, scale=float("nan") if bad else 1.0))
            prec.step(opt)
    assert not [w for w in caught if "consecutive" in str(w.message)]


class _LM(nn.Module):
    def __init__(self, tied=True):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.body = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 10, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight


def test_quant_skip_that_matches_no_module_names_the_closest_paths():
    with pytest.raises(PolicyError, match=r'quant skip pattern "head" \(closest module paths: lm_head'):
        Precision("bf16-true,quant=nf4(skip=head)").setup(_LM(tied=False))
    from dualprec_torch.quant import quantize_module
    with pytest.raises(PolicyError, match=r'quantize_module: quant skip pattern "lm_haed"'):
        quantize_module(_LM(tied=False), "bf16-true,quant=nf4(skip=lm_haed)")
    model = Precision("bf16-true,quant=nf4(skip=lm_*)").setup(_LM(tied=False))  # a pattern that matches
    assert type(model.lm_head) is nn.Linear


def test_quantizing_a_tied_head_is_an_error_naming_the_skip():
    with pytest.raises(QuantizationError, match=r"lm_head, whose weight is tied to embed.weight: the tie would "
                                                r"break.*quant=nf4\(skip=lm_head\)"):
        Precision("nf4").setup(_LM())
    model = Precision("nf4,quant=nf4(skip=lm_head)").setup(_LM())
    assert model.lm_head.weight is model.embed.weight  # the tie kept


def test_master_weights_zero_grad_clears_gradients_that_reached_the_model():
    """A backward after the step (a GAN's generator loss reaching the critic) leaves gradients
    on the model's half-precision parameters; zero_grad must clear them as it does without
    master weights, or they leak into the next step."""
    prec, model, opt = setup_mlp("bf16-true,master=true")
    prec.backward(_loss(prec, model))
    prec.step(opt)
    prec.backward(_loss(prec, model))  # gradients for someone else's step
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad(set_to_none=False)  # the other spelling works too


def test_the_guards_hooks_do_not_follow_a_saved_or_copied_model(tmp_path):
    import copy

    prec, model, opt = setup_mlp("16-mixed")
    torch.save(model, tmp_path / "model.pt")  # whole-module pickling carries the hooks
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    twin = copy.deepcopy(model)
    x = make_batches("mlp", 1)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(x)  # no Precision behind these copies: no warning
        twin(x)


def test_a_direct_step_at_learning_rate_zero_is_allowed():
    """torch.distributed.checkpoint's get_optimizer_state_dict steps a fresh optimizer at
    lr=0 with zero gradients to create its state; that moves nothing and must pass."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    prec, model, opt = setup_mlp("16-mixed")
    before = [p.detach().clone() for p in model.parameters()]
    _init_optim_state(opt)
    assert opt.state and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
