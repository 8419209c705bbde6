"""A run checkpointed at step k and resumed is bit-identical to the uninterrupted run."""

import io

import pytest
import torch
from torch_support import assert_same_state, make_batches, make_model, make_optimizer, run_precision

from dualprec import Policy, PolicyError
from dualprec_torch import Precision

BAD = {1: float("inf"), 4: float("nan")}


def _fresh(policy, kind):
    prec = Precision(policy)
    with prec.init_module():
        model = make_model(kind, seed=123)  # different weights: the checkpoint must overwrite them
    opt = make_optimizer(model.parameters())
    model, opt = prec.setup(model, opt)
    return model, opt, prec


@pytest.mark.parametrize("policy", ["16-mixed,loss_scale=dynamic(init=2**10,interval=2)",
                                    "bf16-mixed", "bf16-true,master=true", "64-true",
                                    "bf16-true,master=true,loss_scale=dynamic(init=2**8,interval=2)"])
@pytest.mark.parametrize("kind", ["mlp", "block"])
def test_resume_is_bit_identical(policy, kind):
    steps, k = 8, 3
    # overflow is injected only where loss scaling can skip it (elsewhere it would poison the run)
    bad = BAD if Policy.parse(policy).loss_scale.enabled else {}
    batches = make_batches(kind, steps)
    log_full = []
    model_full, opt_full, prec_full = run_precision(policy, kind, steps, bad_steps=bad, log=log_full,
                                                    batches=batches)

    log_a = []
    model, opt, prec = run_precision(policy, kind, k, bad_steps=bad, log=log_a, batches=batches[:k])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "precision": prec.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model2, opt2, prec2 = _fresh(policy, kind)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    prec2.load_state_dict(saved["precision"])
    log_b = []
    shifted = {i - k: v for i, v in bad.items() if i >= k}
    run_precision(policy, kind, steps - k, bad_steps=shifted, log=log_b, model=model2, precision=prec2,
                  optimizer=opt2, batches=batches[k:])
    assert log_a + log_b == log_full
    assert_same_state(model2, opt2, model_full, opt_full)
    assert prec2.state_dict()["loss_scale"] == prec_full.state_dict()["loss_scale"]


def test_master_weights_are_in_the_checkpoint():
    policy = "bf16-true,master=true"
    model, opt, prec = run_precision(policy, "mlp", 3)
    masters = prec.state_dict()["master_weights"]  # keyed by parameter name, not position
    params = dict(model.named_parameters())
    assert set(masters) == set(params) and all(t.dtype == torch.float32 for t in masters.values())
    # the float32 masters hold more than the bfloat16 model does
    assert any(not torch.equal(masters[n], p.float()) for n, p in params.items())


def test_loading_a_state_dict_from_another_policy_fails_clearly():
    prec = Precision("16-mixed")
    other = Precision("bf16-mixed")
    with pytest.raises(PolicyError, match='written under policy "16-mixed".*Precision\\("16-mixed"\\)'):
        other.load_state_dict(prec.state_dict())
    other.load_state_dict(prec.state_dict(), strict=False)  # explicitly taking what is shared
    assert other.scale == 1.0


def test_a_grad_scaler_state_dict_is_recognised():
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    model = make_model("mlp")
    scaler.scale(model(torch.ones(2, 16)).sum()).backward()
    prec = Precision("16-mixed")
    with pytest.raises(PolicyError, match="GradScaler"):
        prec.load_state_dict(scaler.state_dict())
    prec.load_grad_scaler_state(scaler.state_dict())
    assert prec.scale == 512.0


def test_state_dict_mid_iteration_asks_for_update():
    prec = Precision("16-mixed")
    model = make_model("mlp")
    a = make_optimizer(model.fc1.parameters())
    b = make_optimizer(model.head.parameters())
    model, a, b = prec.setup(model, a, b)
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        loss = model(prec.convert_input(x)).float().square().mean()
    prec.backward(loss)
    prec.step(a)
    with pytest.raises(RuntimeError, match="update"):
        prec.state_dict()
    prec.update()
    assert prec.state_dict()["loss_scale"] == {"scale": 65536.0, "counter": 1}


def test_weights_loaded_after_setup_reach_the_master_copies():
    prec = Precision("bf16-true,master=true")
    model = make_model("mlp", seed=5)
    opt = make_optimizer(model.parameters())
    model, opt = prec.setup(model, opt)
    pretrained = make_model("mlp", seed=6).to(torch.bfloat16).state_dict()
    model.load_state_dict(pretrained)  # after setup: the masters still hold seed 5
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        loss = model(prec.convert_input(x)).float().square().mean()
    prec.backward(loss)
    prec.step(opt)
    # one AdamW step from the pretrained weights moves each weight by about lr, not to seed 5's
    for p, q in zip(model.parameters(), pretrained.values()):
        assert float((p.detach().float() - q.float()).abs().max()) < 0.05


def test_bfloat16_tensors_reach_the_checkpoint_bit_for_bit_through_the_backends_converter(monkeypatch):
    """The spec's writer takes torch tensors through the conversion dualprec_torch registers
    (the spec imports no torch); without it, a bfloat16 tensor is refused by name."""
    import ml_dtypes
    import numpy as np

    from dualprec import checkpoint
    from dualprec.errors import CheckpointError

    bits = torch.tensor([0x3FC0, 0x7F81, -0x0001, 0x7F80, 0x0001], dtype=torch.int16)  # 1.5, sNaN, NaN, inf, tiny
    masters = {"w": bits.view(torch.bfloat16), "b": torch.arange(3, dtype=torch.float32)}
    state = checkpoint.new_state(Policy.parse("bf16-true,master=true"), 1.0, 0, masters)
    _, tensors = checkpoint.state_to_file(state)
    assert tensors["master.w"].dtype == np.uint16  # stored as its bits
    np.testing.assert_array_equal(tensors["master.w"], bits.numpy().view(np.uint16))
    np.testing.assert_array_equal(tensors["master.b"], np.arange(3, dtype=np.float32))
    back = checkpoint.state_from_file(*checkpoint.state_to_file(state))
    assert back["master_weights"]["w"].dtype == ml_dtypes.bfloat16
    monkeypatch.setattr(checkpoint, "_ARRAY_CONVERTERS", [])
    with pytest.raises(CheckpointError, match="import dualprec_torch first"):
        checkpoint.state_to_file(state)
