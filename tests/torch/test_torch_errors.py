"""Bad input gives a clear error that names the fix; unsupported policies say what is missing."""

import pytest
import torch
from torch_support import loss_fn, make_batches, make_model, make_optimizer, setup_mlp

from dualprec import PolicyError
from dualprec_torch import Precision, UnsupportedPolicyError


def _loss(prec, model):
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        return loss_fn(model(prec.convert_input(x)), y)


@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed", "32-true"])
def test_optimizer_not_passed_to_setup(policy):
    prec = Precision(policy)
    model = prec.setup(make_model("mlp"))
    opt = make_optimizer(model.parameters())
    prec.backward(_loss(prec, model))
    with pytest.raises(ValueError, match=r"not passed to setup\(\).*precision.setup\(model, optimizer\)"):
        prec.step(opt)
    with pytest.raises(ValueError, match="not passed to setup"):
        prec.unscale_(opt)


@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed", "bf16-true,master=true"])
def test_step_before_backward_changes_nothing_and_says_so(policy):
    # torch's own optimizers skip parameters without gradients (Fabric steps them too): no
    # error, but a warning, and no parameter moves
    prec, model, opt = setup_mlp(policy)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"no parameter of this optimizer has a gradient.*precision.backward\(loss\)"):
        assert prec.step(opt) is True
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_plain_loss_backward_under_loss_scaling_is_caught():
    prec, model, opt = setup_mlp("16-mixed")
    _loss(prec, model).backward()  # forgot precision.backward: gradients are not scaled
    with pytest.raises(RuntimeError, match="precision.backward"):
        prec.step(opt)


def test_step_twice_and_unscale_twice():
    prec, model, opt = setup_mlp("16-mixed")
    prec.backward(_loss(prec, model))
    prec.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        prec.unscale_(opt)
    prec.step(opt)
    # a second step without a new backward would reapply the same gradients
    with pytest.raises(RuntimeError, match=r"step\(\) twice for this optimizer with no backward in between"):
        prec.step(opt)
    with pytest.raises(RuntimeError, match="no backward in between"):
        prec.unscale_(opt)


def test_partial_iteration_with_several_optimizers():
    prec = Precision("16-mixed")
    model = make_model("mlp")
    a, b = make_optimizer(model.fc1.parameters()), make_optimizer(model.head.parameters())
    model, a, b = prec.setup(model, a, b)
    prec.backward(_loss(prec, model))
    prec.step(a)
    with pytest.raises(RuntimeError, match="already.*update"):
        prec.step(a)
    with pytest.raises(RuntimeError, match="update"):
        prec.unscale_(a)


def test_plain_backward_is_fine_without_loss_scaling():
    prec, model, opt = setup_mlp("bf16-mixed")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        _loss(prec, model).backward()
        assert prec.step(opt)
    assert opt.state[next(model.parameters())]["step"] == 3
    assert not torch.equal(before[0], next(model.parameters()))


def test_optimizer_over_other_parameters():
    prec = Precision("bf16-mixed")
    with pytest.raises(ValueError, match="not in the model"):
        prec.setup(make_model("mlp"), make_optimizer(make_model("mlp").parameters()))


def test_master_weights_need_a_fresh_optimizer():
    model = make_model("mlp")
    opt = make_optimizer(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    with pytest.raises(PolicyError, match="before its first step"):
        Precision("bf16-true,master=true").setup(model, opt)


def test_state_dict_of_something_else():
    with pytest.raises(PolicyError, match="not a dualprec precision state"):
        Precision("16-mixed").load_state_dict({"scale": 1.0})


@pytest.mark.parametrize("policy,feature", [("params=f64,compute=f32", "autocast")])
def test_unsupported_policies_name_the_missing_feature(policy, feature):
    with pytest.raises(UnsupportedPolicyError, match=feature) as info:
        Precision(policy)
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, PolicyError)


def test_bad_policy_strings_are_policy_errors():
    with pytest.raises(PolicyError, match="did you mean"):
        Precision("bf16-mixd")


def test_lbfgs_with_loss_scaling():
    model = make_model("mlp")
    with pytest.raises(TypeError, match="LBFGS"):
        Precision("16-mixed").setup(model, torch.optim.LBFGS(model.parameters()))
