"""Training through Lightning Fabric with the dualprec plugin, beyond Fabric's own tests:
each scenario trains, saves with fabric.save, resumes in a fresh Fabric with fabric.load, and
must continue exactly as the uninterrupted run."""

import warnings

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")
from lightning.fabric import Fabric  # noqa: E402

from dualprec_torch.fabric import DualprecPrecision  # noqa: E402

BEFORE, AFTER = 3, 3  # steps before the checkpoint, and after the resume


def _fabric(policy):
    return Fabric(accelerator="cpu", devices=1, plugins=[DualprecPrecision(policy)])


def _model(seed=0, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _step(fabric, model, optimizer, step):
    x, y = _batch(step)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x).float(), y)
    fabric.backward(loss)
    optimizer.step()


def _setup(policy, make_opt=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)):
    fabric = _fabric(policy)
    model = _model()
    optimizer = make_opt(model)
    model, optimizer = fabric.setup(model, optimizer)
    return fabric, model, optimizer


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_resumes_exactly(policy, tmp_path, make_opt=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)):
    fabric, model, optimizer = _setup(policy, make_opt)
    for step in range(BEFORE):
        _step(fabric, model, optimizer, step)
    state = {"model": model, "optimizer": optimizer, "precision": fabric.strategy.precision}
    fabric.save(tmp_path / "ckpt", state)
    for step in range(BEFORE, BEFORE + AFTER):
        _step(fabric, model, optimizer, step)
    straight = _params(model)

    fabric2, model2, optimizer2 = _setup(policy, make_opt)
    fabric2.load(tmp_path / "ckpt", {"model": model2, "optimizer": optimizer2,
                                     "precision": fabric2.strategy.precision})
    for step in range(BEFORE, BEFORE + AFTER):
        _step(fabric2, model2, optimizer2, step)
    for a, b in zip(straight, model2.parameters()):
        assert torch.equal(a, b)
    return fabric2, model2, optimizer2


@pytest.mark.parametrize("policy", ["bf16-true,master=true", "16-true,master=true", "16-mixed", "bf16-mixed"])
def test_training_resumes_bit_for_bit_through_fabric_save_and_load(policy, tmp_path):
    fabric, model, optimizer = _assert_resumes_exactly(policy, tmp_path)
    if "master" in policy:  # the optimizer's state is the float32 masters' state
        inner = optimizer.optimizer
        assert {s["exp_avg"].dtype for s in inner.state.values()} == {torch.float32}


def test_master_state_loaded_before_the_optimizer_waits_for_it(tmp_path):
    fabric, model, optimizer = _setup("bf16-true,master=true")
    _step(fabric, model, optimizer, 0)
    fabric.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "precision": fabric.strategy.precision})
    fabric2, model2, optimizer2 = _setup("bf16-true,master=true")
    # "precision" first: the plugin holds the master weights until the optimizer is adopted
    fabric2.load(tmp_path / "ckpt", {"precision": fabric2.strategy.precision, "model": model2,
                                     "optimizer": optimizer2})
    masters = dict(fabric.strategy.precision.state_dict()["master_weights"])
    again = dict(fabric2.strategy.precision.state_dict()["master_weights"])
    assert masters.keys() == again.keys()
    assert all(torch.equal(torch.as_tensor(masters[k]), torch.as_tensor(again[k])) for k in masters)


def test_int8_training_trains_and_resumes_through_fabric(tmp_path):
    pytest.importorskip("bitsandbytes")
    policy = "int8-training"
    fabric, model, optimizer = _setup(policy, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    inner = optimizer.optimizer
    before = _params(model)
    _step(fabric, model, optimizer, 0)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    assert held == {id(p) for p in trainable}  # the optimizer holds the int8-training weights, not stale ones
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _assert_resumes_exactly(policy, tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))


def test_int8_training_optimizer_built_after_setup_module():
    pytest.importorskip("bitsandbytes")
    fabric = _fabric("int8-training")
    model = fabric.setup_module(_model())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    before = _params(model)
    _step(fabric, model, optimizer, 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("opt", ["sgd", "lbfgs"])
def test_optimizer_step_with_a_closure_returns_its_loss(policy, opt):
    fabric = _fabric(policy)
    model = _model()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if opt == "sgd"
                 else torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2))
    model, optimizer = fabric.setup(model, optimizer)
    x, y = _batch(0)
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        fabric.backward(loss)
        losses.append(loss)
        return loss

    before = _params(model)
    out = optimizer.step(closure)
    assert out is losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_closure_under_loss_scaling_is_a_clear_error():
    fabric, model, optimizer = _setup("16-mixed", lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"closure=.*under \"16-mixed\".*out of reach of loss scaling"):
        optimizer.step(lambda: None)


@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed", "16-mixed", "bf16-true,master=true"])
def test_stepping_an_optimizer_without_gradients_leaves_it_alone(policy):
    fabric, model, optimizer = _setup(policy)
    before = _params(model)
    with pytest.warns(UserWarning, match="no parameter of this optimizer has a gradient"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _step(fabric, model, optimizer, 0)  # and training goes on
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("policy", ["32-true", "bf16-mixed", "16-mixed", "bf16-true,master=true"])
def test_alternating_optimizers_gan_style_train_and_resume(policy, tmp_path):
    def run(fabric, d, g, opt_d, opt_g, steps):
        for step in steps:
            x, _ = _batch(step)
            for _ in range(2):  # the critic steps twice per generator step
                opt_d.zero_grad()
                fake = g(x).detach()
                loss_d = d(fake).float().mean() - d(x[:, :4].repeat(1, 1)).float().mean()
                fabric.backward(loss_d)
                opt_d.step()
                fabric.strategy.precision.scale  # reading the scale between steps is harmless
            opt_g.zero_grad()
            loss_g = -d(g(x)).float().mean()
            fabric.backward(loss_g)
            opt_g.step()

    def build(fabric):
        torch.manual_seed(0)
        g, d = nn.Sequential(nn.Linear(16, 4)), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt_g, opt_d = torch.optim.Adam(g.parameters(), lr=1e-3), torch.optim.Adam(d.parameters(), lr=1e-3)
        g, opt_g = fabric.setup(g, opt_g)
        d, opt_d = fabric.setup(d, opt_d)
        return d, g, opt_d, opt_g

    fabric = _fabric(policy)
    d, g, opt_d, opt_g = build(fabric)
    run(fabric, d, g, opt_d, opt_g, range(2))
    names = ("d", "g", "opt_d", "opt_g")
    fabric.save(tmp_path / "ckpt", dict(zip(names, (d, g, opt_d, opt_g)), precision=fabric.strategy.precision))
    run(fabric, d, g, opt_d, opt_g, range(2, 4))

    fabric2 = _fabric(policy)
    objs = build(fabric2)
    fabric2.load(tmp_path / "ckpt", dict(zip(names, objs), precision=fabric2.strategy.precision))
    run(fabric2, *objs, range(2, 4))
    for a, b in zip([*d.parameters(), *g.parameters()], [*objs[0].parameters(), *objs[1].parameters()]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["32-true", "bf16-true", "bf16-mixed"])
def test_plain_loss_backward_is_allowed_without_loss_scaling(policy):
    fabric, model, optimizer = _setup(policy)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x).float(), y).backward()  # Fabric's own plugins allow this
    optimizer.step()


def test_plain_loss_backward_under_loss_scaling_is_refused_by_fabric():
    fabric, model, optimizer = _setup("16-mixed")
    x, y = _batch(0)
    with pytest.raises(RuntimeError, match=r"requires you to call `fabric.backward\(loss\)`"):
        nn.functional.mse_loss(model(x).float(), y).backward()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only torch")
def test_a_cuda_device_on_cpu_only_torch_is_a_clear_error():
    with pytest.raises(ValueError, match=r'device "cuda": this torch .* sees no CUDA device.*device="cpu"'):
        DualprecPrecision("16-mixed", device="cuda")


def test_the_plugin_names_its_torch_precision():
    plugin = DualprecPrecision("bf16-mixed")
    assert plugin.precision == "bf16-mixed"  # Fabric's convention: the precision string
    assert plugin.torch_precision is plugin.dualprec
    assert plugin.scale == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        str(plugin)


@pytest.mark.parametrize("policy", ["nf4", "int8-training", "bf16-true"])
@pytest.mark.parametrize("order", ["load-then-setup", "setup-then-load"])
def test_litgpt_style_empty_init_and_lazy_load(policy, order, tmp_path):
    """LitGPT: the model built under fabric.init_module(empty_init=True), then the checkpoint
    read with Lightning's _lazy_load (tensors read on first use) into it, before or after
    setup.  Uninitialised memory is never quantized; the loaded weights are."""
    if policy != "bf16-true":
        pytest.importorskip("bitsandbytes")
    from lightning.fabric.utilities.load import _lazy_load

    torch.save(_model().state_dict(), tmp_path / "weights.pt")
    fabric = _fabric(policy)
    with fabric.init_module(empty_init=True):
        model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fabric notes the meta-device weights it is handed
        if order == "load-then-setup":
            model.load_state_dict(_lazy_load(tmp_path / "weights.pt"))
            model = fabric.setup(model)
        else:
            model = fabric.setup(model)
            model.load_state_dict(_lazy_load(tmp_path / "weights.pt"))
    reference = _fabric(policy).setup(_model())  # the same weights, set up the plain way
    x = _batch(0)[0]
    assert torch.equal(model(x), reference(x))
    if policy != "bf16-true":
        assert type(model.module[0]).__name__ != "Linear"  # quantized


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed"])
def test_the_plugin_pickles_for_ddp_spawn(policy):
    import pickle

    plugin = pickle.loads(pickle.dumps(DualprecPrecision(policy)))
    assert plugin.precision == policy
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch(0)
    loss = nn.functional.mse_loss(model(x).float(), y)
    if policy == "bf16-mixed":
        loss.backward()  # still allowed after the round trip
    else:
        fabric.backward(loss)
    optimizer.step()


def _setup_module_then_optimizers(policy):
    fabric = _fabric(policy)
    model = fabric.setup_module(_model())  # LitGPT's order: the optimizer is built from the converted model
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return fabric, model, optimizer


@pytest.mark.parametrize("order", [("model", "optimizer", "precision"), ("precision", "model", "optimizer")])
def test_master_weights_resume_when_the_optimizer_is_built_after_setup_module(order, tmp_path):
    # the optimizer is built from the bfloat16 parameters; fabric.load restores its state before
    # its first step, so it must hold the float32 copies by then (torch casts a loaded state to
    # the dtype of the parameter it belongs to)
    policy = "bf16-true,master=true"
    fabric, model, optimizer = _setup_module_then_optimizers(policy)
    for step in range(BEFORE):
        _step(fabric, model, optimizer, step)
    fabric.save(tmp_path / "ckpt", {"model": model, "optimizer": optimizer, "precision": fabric.strategy.precision})
    for step in range(BEFORE, BEFORE + AFTER):
        _step(fabric, model, optimizer, step)
    straight = _params(model)

    fabric2, model2, optimizer2 = _setup_module_then_optimizers(policy)
    objs = {"model": model2, "optimizer": optimizer2, "precision": fabric2.strategy.precision}
    fabric2.load(tmp_path / "ckpt", {k: objs[k] for k in order})
    moments = [v for s in optimizer2.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    for step in range(BEFORE, BEFORE + AFTER):
        _step(fabric2, model2, optimizer2, step)
    for a, b in zip(straight, model2.parameters()):
        assert torch.equal(a, b)
