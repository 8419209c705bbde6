"""The torch backend replaces nothing at run time: the attributes of torch, torch.nn,
torch.nn.functional, torch.Tensor and the torch.nn classes, and every module's own __dict__,
are the same objects before and after training under every preset.  The op table lives in the
dispatcher (AutocastCPU kernels), a per-module override in forward hooks, quantization and FP8
in module swaps (a new child object, never a changed one)."""

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualprec import Policy
from dualprec.presets import preset_names
from dualprec_torch import Precision, ops
from dualprec_torch.caps import device_caps

f32, bf16 = torch.float32, torch.bfloat16


def _namespace_snapshot() -> dict:
    snap = {}
    for mod in (torch, nn, F):
        snap.update({(mod.__name__, k): v for k, v in list(vars(mod).items())})
    for cls in [torch.Tensor] + [v for v in vars(nn).values() if isinstance(v, type) and issubclass(v, nn.Module)]:
        snap.update({(cls.__qualname__, k): v for k, v in list(vars(cls).items())})
    return snap


_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _instance_snapshot(model: nn.Module) -> dict:
    """path -> (module, its class, a copy of its __dict__, copies of its parameter / buffer /
    child dictionaries)."""
    return {path: (m, type(m), dict(vars(m)), _contents(m)) for path, m in model.named_modules()}


def _contents(m: nn.Module) -> dict:
    """name -> id of each entry of the module's parameter, buffer and child dictionaries, and
    of its hook registries."""
    names = list(_CONTAINERS) + [k for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict)]
    return {k: {n: id(v) for n, v in vars(m)[k].items()} for k in names}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.head = nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8)

    def forward(self, x):
        h = torch.softmax(self.ln(F.gelu(self.fc1(x))), -1)
        return self.head(h.exp() + h.pow(2).sum(-1, keepdim=True)).float()


def _policy_here(name: str) -> str:
    """The preset, or the fallback its capability check names where this CPU cannot run it (the
    transformer-engine presets without Transformer Engine: native FP8), with an override on the
    head for the mixed ones."""
    report = Policy.parse(name).check(device_caps("cpu"))
    policy = str(name if report.ok else report.fallback)
    assert report.ok or name.startswith("transformer-engine"), (name, report)
    return f"{policy},@head=32-true" if name in ("bf16-mixed", "16-mixed", "mixed_bfloat16") else policy


def _train_once(name: str) -> tuple[nn.Module, dict]:
    """Set up a fresh model under preset ``name`` and run two training steps."""
    torch.manual_seed(0)
    model = Net()
    before = _instance_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 and quantization notes
        prec = Precision(_policy_here(name), device="cpu")
        model, opt = prec.setup(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    x = torch.randn(4, 64)
    for _ in range(2):
        opt.zero_grad()
        with prec.autocast():
            loss = model(prec.convert_input(x)).pow(2).mean()
        prec.backward(loss)
        prec.step(opt)
    copy.deepcopy(model)
    return model, before


_PRESETS = preset_names(include_aliases=False)


def test_every_preset_is_checked():
    assert {"bf16-mixed", "16-mixed", "nf4", "int8", "bf16-true", "64-true", "transformer-engine"} <= set(_PRESETS)


def _plain_step() -> None:
    """The same step without dualprec: torch's own lazy set-up (importing torch._dynamo on the
    first optimizer step re-binds torch.manual_seed) happens before the snapshot."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=bf16):
        loss = model(torch.randn(4, 64)).pow(2).mean()
    loss.backward()
    opt.step()
    copy.deepcopy(model)


@pytest.mark.parametrize("name", _PRESETS)
def test_no_attribute_of_torch_or_of_a_module_is_replaced(name):
    _plain_step()
    before = _namespace_snapshot()
    model, instances = _train_once(name)
    for path, (module, cls, state, contents) in instances.items():
        now = dict(model.named_modules()).get(path)
        if now is not module:  # swapped for a quantized or FP8 layer: a new object, allowed
            assert now is not None and type(now) is not cls, path
            # ... and the replaced layer is left as it was: same entries, nothing added to it
            assert _contents(module) == contents, path
        assert type(module) is cls, (path, type(module))
        assert vars(module).keys() == state.keys(), (path, vars(module).keys() ^ state.keys())
        changed = [k for k, v in state.items() if vars(module)[k] is not v]
        assert not changed, (path, changed)
    for path, module in model.named_modules():
        assert "forward" not in vars(module), path
    after = _namespace_snapshot()
    replaced = sorted(k for k, v in before.items() if after.get(k) is not v)
    assert not replaced, replaced
    added = sorted(k for k in after.keys() - before.keys() if not isinstance(after[k], types.ModuleType))
    assert not added, added  # (a submodule of torch imported lazily is the only allowed addition)


def test_override_scope_is_forward_hooks_set_up_once():
    model = Net()
    for _ in range(2):
        Precision("bf16-mixed,@head=32-true", device="cpu").setup(model)
    pre = [h for h in model.head._forward_pre_hooks.values() if type(getattr(h, "__self__", None)).__name__ == "_PolicyScope"]
    post = [h for h in model.head._forward_hooks.values() if type(getattr(h, "__self__", None)).__name__ == "_PolicyScope"]
    assert len(pre) == len(post) == 1 and pre[0].__self__ is post[0].__self__
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(("out", o.dtype)) and None)
    model.head.register_forward_pre_hook(lambda m, i: seen.append(("in", i[0].dtype)) and None)
    with Precision("bf16-mixed", device="cpu").autocast():
        h = model.fc1(torch.randn(2, 64))
        assert h.dtype == bf16 and model.head(h).dtype == f32  # the override's own compute dtype
    # a hook registered after setup sees the output the caller gets (cast by the scope); its
    # pre-hook runs after the scope's (inputs already cast to the override's float32)
    assert seen == [("in", f32), ("out", f32)]


def test_override_scope_is_left_when_the_module_raises():
    class Boom(nn.Module):
        def forward(self, x):
            assert torch.is_autocast_enabled("cpu") is False  # the 32-true override turned autocast off
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    prec = Precision("bf16-mixed,@1=32-true", device="cpu")
    model = prec.setup(model)
    with prec.autocast():
        depth = ops._STATE.depth
        with pytest.raises(ValueError, match="boom"):
            model(torch.randn(2, 4))
        assert torch.is_autocast_enabled("cpu") and ops._STATE.depth == depth  # back in the parent's context
        assert torch.exp(torch.randn(2).to(bf16)).dtype == f32  # and its table
    assert not torch.is_autocast_enabled("cpu")


# The Fabric plugin adopts optimizers by replacing lightning's _FabricOptimizer.__init__ when
# dualprec_torch.fabric is imported: no precision-plugin hook sees an optimizer before fabric.load
# restores its state (docs/fabric.md, "Why this is a patch and not a plugin hook").  strict: the
# day the rule is met, this fails as XPASS and the mark goes.
@pytest.mark.xfail(strict=True, reason="dualprec_torch.fabric replaces lightning.fabric.wrappers._FabricOptimizer."
                   "__init__ at import")
def test_lightning_fabric_classes_are_not_replaced():
    pytest.importorskip("lightning")
    from lightning.fabric.wrappers import _FabricOptimizer

    import dualprec_torch.fabric  # noqa: F401

    assert _FabricOptimizer.__init__.__module__ == "lightning.fabric.wrappers"
