"""The Fabric scenarios of tests/torch/test_torch_fabric_training.py that were checked for
one step only, now trained, saved (fabric.save), resumed in a fresh Fabric (fabric.load) and
compared bit for bit with the uninterrupted run: optimizer.step(closure) (SGD, LBFGS), an
optimizer without gradients in some iterations, and a plain loss.backward() without loss
scaling."""

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")
from lightning.fabric import Fabric  # noqa: E402

from dualprec_torch.fabric import DualprecPrecision  # noqa: E402

BEFORE, AFTER = 2, 2


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _resumes_exactly(policy, build, step, tmp_path):
    """``build(fabric) -> dict of named objects`` (models, optimizers); ``step(fabric, objs,
    i)`` one iteration.  Trains BEFORE steps, saves, trains AFTER more; a fresh Fabric loads
    the checkpoint and trains the same AFTER steps: the parameters must be equal."""
    def fabric_():
        return Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision(policy)])

    fabric = fabric_()
    objs = build(fabric)
    for i in range(BEFORE):
        step(fabric, objs, i)
    fabric.save(tmp_path / "ckpt", dict(objs, precision=fabric.strategy.precision))
    start = [p.detach().clone() for m in objs.values() if isinstance(m, nn.Module) for p in m.parameters()]
    for i in range(BEFORE, BEFORE + AFTER):
        step(fabric, objs, i)
    straight = [p.detach().clone() for m in objs.values() if isinstance(m, nn.Module) for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, straight))  # it trained after the save

    fabric2 = fabric_()
    objs2 = build(fabric2)
    fabric2.load(tmp_path / "ckpt", dict(objs2, precision=fabric2.strategy.precision))
    for i in range(BEFORE, BEFORE + AFTER):
        step(fabric2, objs2, i)
    resumed = [p for m in objs2.values() if isinstance(m, nn.Module) for p in m.parameters()]
    assert len(resumed) == len(straight)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("opt", ["sgd", "lbfgs"])
def test_closure_training_resumes(policy, opt, tmp_path):
    def build(fabric):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt == "sgd"
                     else torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=4))
        model, optimizer = fabric.setup(model, optimizer)
        return {"model": model, "optimizer": optimizer}

    def step(fabric, objs, i):
        x, y = _batch(i)
        model, optimizer = objs["model"], objs["optimizer"]
        losses = []

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y)
            fabric.backward(loss)
            losses.append(loss)
            return loss

        assert optimizer.step(closure) is losses[0]  # Fabric returns the closure's loss

    _resumes_exactly(policy, build, step, tmp_path)


@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed", "16-mixed", "bf16-true,master=true"])
def test_an_optimizer_without_gradients_in_some_steps_resumes(policy, tmp_path):
    """Two models, each with its own optimizer; the second gets gradients only on even steps,
    yet both optimizers step every iteration (Fabric users write this)."""
    def build(fabric):
        torch.manual_seed(0)
        body, head = nn.Linear(16, 4), nn.Linear(4, 4)
        opt_body = torch.optim.AdamW(body.parameters(), lr=1e-2)
        opt_head = torch.optim.AdamW(head.parameters(), lr=1e-2)
        body, opt_body = fabric.setup(body, opt_body)
        head, opt_head = fabric.setup(head, opt_head)
        return {"body": body, "head": head, "opt_body": opt_body, "opt_head": opt_head}

    def step(fabric, objs, i):
        x, y = _batch(i)
        objs["opt_body"].zero_grad()
        objs["opt_head"].zero_grad()
        out = objs["body"](x)
        if i % 2 == 0:
            out = objs["head"](out)
        fabric.backward(nn.functional.mse_loss(out.float(), y))
        objs["opt_body"].step()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "step\\(\\): no parameter of this optimizer has a gradient")
            objs["opt_head"].step()  # no gradient on odd steps: changes nothing

    _resumes_exactly(policy, build, step, tmp_path)


@pytest.mark.parametrize("policy", ["32-true", "bf16-true", "bf16-mixed"])
def test_plain_loss_backward_training_resumes(policy, tmp_path):
    def build(fabric):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        return {"model": model, "optimizer": optimizer}

    def step(fabric, objs, i):
        x, y = _batch(i)
        objs["optimizer"].zero_grad()
        nn.functional.mse_loss(objs["model"](x).float(), y).backward()  # not fabric.backward
        objs["optimizer"].step()

    _resumes_exactly(policy, build, step, tmp_path)


def _two_optimizers_after_one_backward(plugin):
    """One backward, then optimizer a (whose gradient overflows) and optimizer b step: returns
    b's applied step divided by its true (unscaled) gradient, and the scale after both."""
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 1)
    a, opt_a = fabric.setup(a, torch.optim.SGD(a.parameters(), lr=1.0))
    b, opt_b = fabric.setup(b, torch.optim.SGD(b.parameters(), lr=1.0))
    fabric.backward(b(a(torch.ones(2, 4))).float().mean() * 1e-2)
    true_grad = b.weight.grad / 2.0**16  # exact: a power of two
    a.weight.grad[0, 0] = float("inf")
    opt_a.step()
    before = b.weight.detach().clone()
    opt_b.step()
    return (before - b.weight.detach()) / true_grad


def test_a_second_optimizer_after_an_overflow_gets_its_true_gradient():
    """The scale advances once per backward, so b is unscaled by the scale its gradient was
    made with.  Fabric's own MixedPrecision updates after a's skipped step and unscales b by
    the halved scale: b steps with twice its gradient (the difference docs/fabric.md states)."""
    from lightning.fabric.plugins.precision import MixedPrecision

    ours = DualprecPrecision("16-mixed", device="cpu")
    assert torch.equal(_two_optimizers_after_one_backward(ours), torch.ones(1, 4))
    assert ours.scale == 2.0**15  # one backoff for the one overflowing iteration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _two_optimizers_after_one_backward(MixedPrecision("16-mixed", device="cpu"))
    assert torch.equal(theirs, torch.full((1, 4), 2.0))


def test_a_forward_around_fabrics_wrapper_is_said_once():
    """model.module(x) (or the raw model) skips Fabric's forward context: under a mixed
    policy its forward computes in float32.  Said once; Fabric's own call is silent."""
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision("bf16-mixed")])
    model = fabric.setup(nn.Linear(16, 4))
    x = torch.ones(2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(x).dtype == torch.float32  # autocast inside, float32 output: no warning
    with pytest.warns(UserWarning, match=r'"bf16-mixed": the model ran outside precision.autocast\(\)'):
        assert model.module(x).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.module(x)  # once
