"""FP8 and block-scaled conversion is a module swap (issue 23): a new FP8Linear /
BlockScaledLinear around the same Parameter objects takes the nn.Linear's place in every
parent holding it; the nn.Linear object itself keeps its class and its attributes."""

import copy
import warnings

import pytest
import torch
from torch import nn

from dualprec import FP8Recipe, Policy
from dualprec_torch import Precision, fp8
from dualprec_torch.blockscale import BlockScaledLinear
from dualprec_torch.fp8 import FP8Linear

# one per-tensor recipe (FP8Linear), one block-scaled recipe (BlockScaledLinear)
KINDS = [("bf16-mixed,fp8=delayed(history=4,engine=native)", FP8Linear),
         ("bf16-mixed,fp8=mxfp8(engine=native)", BlockScaledLinear)]
IDS = ["fp8linear", "blockscaled"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.act = nn.ReLU()
        self.inner = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32, bias=False))
        self.head = nn.Linear(32, 32)

    def forward(self, x):
        return self.head(self.inner(self.act(self.fc1(x))))


def _snapshot(m: nn.Module):
    """The module's class, its __dict__ (values by identity) and the entries of its parameter,
    buffer and child dictionaries and of its hook registries (by identity)."""
    names = ["_parameters", "_buffers", "_modules"] + [k for k, v in vars(m).items() if "hooks" in k
                                                       and isinstance(v, dict)]
    return (type(m), {k: id(v) for k, v in vars(m).items()}, {k: {n: id(v) for n, v in vars(m)[k].items()}
                                                               for k in names})


def _convert(model, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fp8.convert_module(model, Policy.parse(spec))


@pytest.mark.parametrize("spec,cls", KINDS, ids=IDS)
def test_swap_keeps_parameters_paths_and_leaves_the_linear_unchanged(spec, cls):
    torch.manual_seed(0)
    model = Net()
    linears = {p: m for p, m in model.named_modules() if type(m) is nn.Linear}
    before = {p: _snapshot(m) for p, m in linears.items()}
    params = dict(model.named_parameters())
    paths = [p for p, _ in model.named_modules()]
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the conversion

    assert _convert(model, spec) is model
    for path, old in linears.items():
        new = model.get_submodule(path)
        assert type(new) is cls and new is not old, path
        assert _snapshot(old) == before[path], path  # no class change, nothing added to it
        assert new.weight is old.weight and new.bias is old.bias, path
    assert dict(model.named_parameters()) == params  # same names, same Parameter objects
    assert [p for p, _ in model.named_modules()] == paths  # same order
    state_keys = list(model.state_dict())
    assert [k for k in state_keys if ".fp8_" not in k and "blockscale" not in k] == keys  # old keys, same order

    w0 = model.head.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(32, 32)).float().pow(2).mean()
    loss.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    opt.step()  # the optimizer built before the conversion moves the converted layers' weights
    assert torch.equal(model.head.weight.detach(), w0 - 0.5 * model.head.weight.grad)


@pytest.mark.parametrize("spec,cls", KINDS, ids=IDS)
def test_hooks_registered_on_the_linear_run_on_the_new_layer_and_their_handles_work(spec, cls):
    torch.manual_seed(0)
    model = Net()
    old = model.head
    seen = []
    pre = old.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m))))
    post = old.register_forward_hook(lambda m, args, out: seen.append(("post", type(m))) or out * 2)
    back = old.register_full_backward_hook(lambda m, gin, gout: seen.append(("back", type(m))))
    _convert(model, spec)
    assert type(model.head) is cls

    x = torch.randn(32, 32)
    model(x).float().sum().backward()
    assert seen == [("pre", cls), ("post", cls), ("back", cls)]
    model.eval()  # no state moves between the two calls below
    with torch.no_grad():
        h = model.inner(model.act(model.fc1(x)))
        y = model.head(h)
        for handle in (pre, post, back):
            handle.remove()  # the handles from the nn.Linear remove the hooks from the new layer
        seen.clear()
        assert torch.equal(y, 2 * model.head(h))  # the forward hook's result was the layer's output
    assert seen == []


@pytest.mark.parametrize("spec,cls", KINDS, ids=IDS)
def test_a_layer_at_two_paths_is_one_new_layer_at_both(spec, cls):
    model = Net()
    model.head2 = model.head  # the same module registered twice
    _convert(model, spec)
    assert type(model.head) is cls and model.head2 is model.head
    assert dict(model.named_modules(remove_duplicate=False))["head2"] is model.head


@pytest.mark.parametrize("spec,cls", KINDS, ids=IDS)
def test_a_bare_linear_comes_back_as_the_new_layer(spec, cls):
    layer = nn.Linear(32, 32)
    before = _snapshot(layer)
    new = _convert(layer, spec)
    assert type(new) is cls and new.weight is layer.weight and _snapshot(layer) == before

    layer = nn.Linear(32, 32)
    before = _snapshot(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec = Precision(spec, device="cpu")
        model, opt2 = prec.setup(layer, opt)
    assert type(model) is cls and opt2 is opt and model.weight is layer.weight
    assert model._forward_pre_hooks  # setup's autocast check, on the new layer ...
    assert _snapshot(layer) == before  # ... not on the Linear, which is left as it was
    with prec.autocast():
        loss = model(prec.convert_input(torch.randn(32, 32))).float().pow(2).mean()
    prec.backward(loss)
    prec.step(opt)
    assert model.weight.grad is not None


@pytest.mark.parametrize("convert", [lambda lin: FP8Linear.from_linear(lin, FP8Recipe("current")),
                                     lambda lin: BlockScaledLinear.from_linear(lin, FP8Recipe("mxfp8"))],
                         ids=IDS)
def test_convert_refuses_what_it_cannot_swap(convert):
    assert type(convert(nn.Linear(32, 32))) in (FP8Linear, BlockScaledLinear)

    class Sub(nn.Linear):
        pass

    with pytest.raises(TypeError, match="plain nn.Linear, got Sub"):
        convert(Sub(32, 32))
    wrapped = nn.Linear(32, 32)
    wrapped.forward = lambda x: x  # an instance-level forward (a wrapper)
    with pytest.raises(TypeError, match="forward replaced on the instance.*convert before wrapping"):
        convert(wrapped)
    compiled = nn.Linear(32, 32)
    compiled.compile()
    with pytest.raises(TypeError, match=r"compiled in place.*convert first, then compile"):
        convert(compiled)


@pytest.mark.parametrize("spec,cls", KINDS, ids=IDS)
def test_deepcopy_and_state_dict_of_the_converted_model(spec, cls):
    torch.manual_seed(0)
    model = _convert(Net(), spec)
    model.head.register_forward_hook(lambda m, args, out: out + 1)
    x = torch.randn(32, 32)
    with torch.no_grad():
        y = model(x)
    twin = copy.deepcopy(model)
    assert type(twin.head) is cls and twin.head.weight is not model.head.weight
    with torch.no_grad():
        assert torch.equal(twin(x), y)  # the hook came along
    twin.train()
    twin(x).sum().backward()  # a training step of the copy: its state moves, the original's does not
    assert model.head.weight.grad is None
    fresh = _convert(Net(), spec)
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_torch_compile_runs_the_converted_model():
    torch.manual_seed(0)
    model = _convert(Net(), "32-true,fp8=current(engine=native)")
    x = torch.randn(32, 32)
    compiled = torch.compile(model, backend="eager")  # dynamo traces the swapped layers
    assert torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("cls", [FP8Linear, BlockScaledLinear])
def test_old_in_place_convert_fails_loudly(cls):
    """`convert` used to change the Linear in place; a caller that ignores a returned layer
    would silently keep a plain Linear, so the old name raises, naming `from_linear`."""
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.convert\(linear\) changed the layer in place .* "
                                        rf"{cls.__name__}\.from_linear"):
        cls.convert(nn.Linear(32, 32), FP8Recipe("mxfp8"))
