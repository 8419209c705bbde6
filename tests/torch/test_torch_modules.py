"""init_module, per-module overrides by module path, convert_input / convert_output."""

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_support import make_batches, make_model, make_optimizer

from dualprec_torch import Precision

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


class Recorder(nn.Module):
    """Records the dtype its weight had when it was created, and a complex buffer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.created_as = self.weight.dtype
        self.register_buffer("explicit", torch.zeros(2, dtype=torch.complex64))
        self.cparam = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
        self.filled = torch.zeros(3)
        nn.init.constant_(self.filled, 7.0)


@pytest.mark.parametrize("policy,dtype", [("bf16-true", bf16), ("16-true", f16), ("64-true", f64),
                                          ("bf16-mixed", f32), ("32-true", f32)])
def test_init_module_creates_params_in_the_param_dtype(policy, dtype):
    with Precision(policy).init_module():
        m = Recorder()
    assert m.created_as == dtype  # never materialised in float32 first
    assert torch.get_default_dtype() == f32


def test_64_true_makes_complex_buffers_complex128():
    with Precision("64-true").init_module():
        m = Recorder()
    assert m.explicit.dtype == m.cparam.dtype == torch.complex128
    assert isinstance(m.cparam, nn.Parameter)
    with Precision("32-true").init_module():
        assert Recorder().explicit.dtype == torch.complex64  # the hooks are gone again


def test_init_module_restores_the_default_dtype_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Precision("64-true").init_module():
            assert torch.get_default_dtype() == f64
            raise RuntimeError("boom")
    assert torch.get_default_dtype() == f32
    assert torch.zeros(1, dtype=torch.complex64).dtype == torch.complex64


def test_empty_init_skips_initialisers():
    with Precision("bf16-true").init_module(empty_init=True):
        skipped = Recorder()
    with Precision("bf16-true").init_module():
        done = Recorder()
    assert torch.equal(skipped.filled, torch.zeros(3, dtype=bf16))
    assert torch.equal(done.filled, torch.full((3,), 7.0, dtype=bf16))


def test_setup_keeps_parameter_objects_so_existing_optimizers_work():
    model = make_model("mlp")
    opt = make_optimizer(model.parameters())
    ids = [id(p) for p in model.parameters()]
    model, opt = Precision("bf16-true").setup(model, opt)
    assert [id(p) for p in model.parameters()] == ids
    assert all(p.dtype == bf16 for g in opt.param_groups for p in g["params"])


def test_override_keeps_the_head_in_float32_under_bf16_mixed():
    prec = Precision("bf16-mixed,@head=(compute=float32)")
    model = prec.setup(make_model("block"))
    x, _ = make_batches("block", 1)[0]
    seen = {}
    model.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1", o.dtype))
    model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", o.dtype))
    with prec.autocast():
        out = model(prec.convert_input(x))
    assert seen == {"fc1": bf16, "head": f32}
    # the same as the hand-written: head under autocast(enabled=False) on a float32 input
    ref = make_model("block")
    with torch.autocast("cpu", dtype=bf16):
        h = ref.head
        ref.head = nn.Identity()
        body = ref(x.to(bf16), explicit_fp32=True)
        with torch.autocast("cpu", enabled=False):
            want = h(body.float())
    assert torch.equal(out, want)


def test_override_param_dtype_under_a_true_policy():
    prec = Precision("bf16-true,@head=(params=float32)")
    model = prec.setup(make_model("mlp"))
    assert model.head.weight.dtype == f32 and model.fc1.weight.dtype == bf16
    x, y = make_batches("mlp", 1)[0]
    with prec.autocast():
        out = model(prec.convert_input(x))
    # head: float32 params computing in bfloat16 (a mixed module), output in its output dtype
    ref = make_model("mlp")
    head = ref.head
    ref.head = nn.Identity()
    ref = ref.to(bf16)
    with torch.autocast("cpu", dtype=bf16):
        want = head(ref(x.to(bf16))).float()
    assert out.dtype == f32 and torch.equal(out, want)
    prec2 = Precision("bf16-true,@head=(params=float32)")
    model2 = make_model("mlp")
    opt = make_optimizer(model2.parameters())
    model2, opt = prec2.setup(model2, opt)
    with prec2.autocast():
        loss = F.cross_entropy(model2(prec2.convert_input(x)), y)
    prec2.backward(loss)
    assert model2.head.weight.grad.dtype == f32 and model2.fc1.weight.grad.dtype == bf16
    assert prec2.step(opt)


def test_setup_twice_does_not_stack_override_wrappers():
    model = make_model("mlp")
    Precision("bf16-mixed,@head=32-true").setup(model)
    Precision("bf16-mixed,@head=32-true").setup(model)
    x = torch.randn(2, 16)
    with Precision("bf16-mixed").autocast():
        assert model(x).dtype == f32


def test_convert_input_and_output_over_collections():
    prec = Precision("bf16-mixed")
    Pair = namedtuple("Pair", "a b")

    @dataclass
    class Batch:
        x: torch.Tensor
        ids: torch.Tensor

    data = {"x": torch.randn(2), "ids": torch.arange(3), "mask": torch.ones(2, dtype=torch.bool),
            "z": torch.randn(2, dtype=torch.complex64), "nested": [Pair(torch.randn(1), 3)],
            "dc": Batch(torch.randn(2), torch.arange(2)), "s": "text"}
    got = prec.convert_input(data)
    assert got["x"].dtype == bf16 and got["nested"][0].a.dtype == bf16 and got["dc"].x.dtype == bf16
    assert got["ids"].dtype == torch.int64 and got["mask"].dtype == torch.bool
    assert got["z"].dtype == torch.complex64 and got["s"] == "text" and isinstance(got["nested"][0], Pair)
    assert prec.convert_output(got)["x"].dtype == f32
    assert Precision("mixed_bfloat16").convert_output(torch.randn(2)).dtype == bf16
    assert Precision("64-true").convert_input(torch.randn(2)).dtype == f64
