"""Engine selection and the Transformer Engine adapter, driven through a stand-in
``transformer_engine`` package (TE cannot be installed here): the Policy -> TE-argument
mapping, the API fallbacks for older TE, and which layers are replaced or skipped."""

import sys

import pytest
import torch
from te_stand_in import stand_in as _stand_in
from torch import nn

from dualprec import FP8Recipe, Policy, UnsupportedPolicyError
from dualprec_torch import fp8, te


@pytest.fixture(params=[True, False], ids=["te2", "te1"])
def stand_in(request, monkeypatch):
    modules, calls = _stand_in(new_api=request.param)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["transformer_engine.pytorch"], modules["transformer_engine.common.recipe"], calls


@pytest.fixture
def no_te(monkeypatch):
    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
                 "transformer_engine.common.recipe"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


# --------------------------------------------------------------------------- engine selection


def test_engine_selection(monkeypatch, stand_in):
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (9, 0))
    assert fp8.select_engine(FP8Recipe()) == "transformer-engine"
    assert fp8.select_engine(FP8Recipe(engine="native")) == "native"
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (8, 0))
    assert fp8.select_engine(FP8Recipe()) == "native"  # TE imports, but the GPU has no FP8
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: None)
    assert fp8.select_engine(FP8Recipe()) == "native"
    assert fp8.select_engine(FP8Recipe(engine="transformer-engine")) == "transformer-engine"


def test_forced_transformer_engine_without_te_fails_clearly(monkeypatch, no_te):
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (9, 0))
    assert fp8.select_engine(FP8Recipe()) == "native" and not te.available()
    with pytest.raises(UnsupportedPolicyError, match=r"Transformer Engine is not installed.*dualprec\[te\]"):
        fp8.convert_module(nn.Linear(16, 16), Policy.parse("bf16-mixed,fp8=delayed(engine=te)"))


def test_pre_ada_gpu_without_emulation_names_the_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100")
    with pytest.raises(UnsupportedPolicyError, match=r"NVIDIA A100 has 8\.0.*emulate=True"):
        fp8.check_device("cuda")
    fp8.check_device("cuda", emulate=True)
    fp8.check_device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 9))
    fp8.check_device("cuda:0")


# --------------------------------------------------------------------------- the TE adapter


def test_recipe_mapping(stand_in):
    _, recipes, _ = stand_in
    delayed = te.te_recipe(FP8Recipe())
    assert isinstance(delayed, recipes.DelayedScaling) and delayed.kwargs == dict(
        fp8_format=recipes.Format.HYBRID, margin=0, amax_history_len=1024, amax_compute_algo="max")
    custom = te.te_recipe(Policy.parse("bf16-mixed,fp8=delayed(history=16,margin=2,algo=most_recent,"
                                       "format=e4m3)").fp8)
    assert custom.kwargs == dict(fp8_format=recipes.Format.E4M3, margin=2, amax_history_len=16,
                                 amax_compute_algo="most_recent")
    if hasattr(recipes, "Float8CurrentScaling"):
        current = te.te_recipe(FP8Recipe("current"))
        assert type(current) is recipes.Float8CurrentScaling
        assert current.kwargs == dict(fp8_format=recipes.Format.HYBRID)
    else:
        with pytest.raises(UnsupportedPolicyError, match="Float8CurrentScaling"):
            te.te_recipe(FP8Recipe("current"))
    assert te.te_recipe(Policy.parse("transformer-engine").fp8).kwargs["fp8_format"] is recipes.Format.HYBRID


def test_autocast_and_init_contexts_use_the_api_this_te_has(stand_in):
    module, recipes, calls = stand_in
    with te.autocast(FP8Recipe(), group="pg"):
        pass
    with te.init_context(FP8Recipe()):
        pass
    (name, kwargs), _, (init_name, init_kwargs), _ = calls
    if hasattr(module, "autocast"):
        assert name == "autocast" and set(kwargs) == {"enabled", "recipe", "amax_reduction_group"}
        assert kwargs["amax_reduction_group"] == "pg" and init_name == "quantized_model_init"
    else:
        assert name == "fp8_autocast" and set(kwargs) == {"enabled", "fp8_recipe", "fp8_group"}
        assert kwargs["fp8_group"] == "pg" and init_name == "fp8_model_init"
    recipe = kwargs.get("recipe", kwargs.get("fp8_recipe"))
    assert isinstance(recipe, recipes.DelayedScaling) and kwargs["enabled"] is True
    assert init_kwargs["enabled"] is True and isinstance(init_kwargs["recipe"], recipes.DelayedScaling)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)
        self.odd = nn.Linear(32, 12)    # out_features % 8 != 0: TE cannot run it
        self.narrow = nn.Linear(24, 16)  # in_features % 16 != 0
        self.head = nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(self.block(x))
        return self.head(self.narrow(torch.cat([h[..., :12], self.odd(h)], -1)))


def test_layer_selection_replacement_and_autocast(stand_in):
    module, recipes, calls = stand_in
    torch.manual_seed(0)
    model, reference = Net(), Net()
    reference.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning) as record:
        out = fp8.convert_module(model, Policy.parse("bf16-mixed,fp8=delayed(engine=te),@head=(fp8=none)"))
    assert out is model
    messages = " ".join(str(w.message) for w in record)
    assert "odd" in messages and "narrow" in messages and "head" not in messages
    assert type(model.block[0]) is module.LayerNormLinear and type(model.block[1]) is nn.Identity
    assert type(model.block[3]) is module.Linear and type(model.norm) is module.LayerNorm
    assert type(model.odd) is nn.Linear and type(model.narrow) is nn.Linear and type(model.head) is nn.Linear
    fused = model.block[0]
    assert fused.args == (32, 64) and fused.kwargs["eps"] == 1e-5 and fused.kwargs["params_dtype"] == torch.float32
    assert torch.equal(fused.weight, reference.block[1].weight)
    assert torch.equal(fused.layer_norm_weight, reference.block[0].weight)
    x = torch.randn(8, 32)
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    entered = [c for c in calls if c[0] in ("autocast", "fp8_autocast")]
    assert len(entered) == 1 and calls[-1][0].startswith("exit")
    forwards = [c for c in calls if c[0] == "forward"]
    assert forwards == [("forward", "LayerNormLinear"), ("forward", "Linear")]
    fp8.convert_module(model, Policy.parse("bf16-mixed,fp8=delayed(engine=te)"))  # again: no stacked autocast
    calls.clear()
    model(x)
    assert len([c for c in calls if c[0] in ("autocast", "fp8_autocast")]) == 1


def test_te_autocast_by_hooks_leaves_forward_alone_and_closes_on_error(stand_in):
    """The model runs under te.autocast through forward hooks: its ``forward`` is the class's
    (nothing in the instance's __dict__), and a forward that raises still leaves the context."""
    module, recipes, calls = stand_in

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x, fail=False):
            y = self.fc(x)
            if fail:
                raise RuntimeError("boom")
            return y

    model = fp8.convert_module(Boom(), Policy.parse("bf16-mixed,fp8=delayed(engine=te)"))
    assert "forward" not in model.__dict__ and type(model).forward is Boom.forward
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(4, 32), fail=True)
    names = [c[0] for c in calls if c[0] != "forward"]
    assert len(names) == 2 and names[0] in ("autocast", "fp8_autocast") and names[1] == "exit " + names[0]


def test_current_scaling_and_module_filter(stand_in):
    module, recipes, calls = stand_in
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    policy = Policy.parse("bf16-mixed,fp8=current(engine=te)" if hasattr(recipes, "Float8CurrentScaling")
                          else "bf16-mixed,fp8=delayed(engine=te)")
    fp8.convert_module(model, policy, module_filter_fn=lambda m, path: path != "1")
    assert type(model[0]) is module.Linear and type(model[1]) is nn.Linear


def test_init_context_enters_quantized_model_init_only_for_te(stand_in):
    module, recipes, calls = stand_in
    with fp8.init_context(Policy.parse("bf16-mixed,fp8=delayed(engine=te)"), torch.device("cpu")):
        pass
    assert calls[0][0] in ("quantized_model_init", "fp8_model_init")
    calls.clear()
    with fp8.init_context(Policy.parse("bf16-mixed,fp8=delayed(engine=native)")):
        pass
    with fp8.init_context(Policy.parse("bf16-mixed")):
        pass
    assert calls == []


# --------------------------------------------------------------------------- block recipes


@pytest.mark.parametrize("spec, name, kwargs", [
    ("mxfp8", "MXFP8BlockScaling", {"fp8_format": "E4M3"}),
    ("mxfp8(rounding=rceil,format=hybrid)", "MXFP8BlockScaling", {"fp8_format": "HYBRID"}),
    ("nvfp4", "NVFP4BlockScaling", {"disable_stochastic_rounding": False, "disable_rht": False,
                                    "disable_2d_quantization": False}),
    ("nvfp4(sr=false)", "NVFP4BlockScaling", {"disable_stochastic_rounding": True, "disable_rht": False,
                                              "disable_2d_quantization": False}),
    ("nvfp4(rht=false)", "NVFP4BlockScaling", {"disable_stochastic_rounding": False, "disable_rht": True,
                                               "disable_2d_quantization": False}),
    ("nvfp4(sr=false,rht=false,wblocks=1x16)", "NVFP4BlockScaling", {
        "disable_stochastic_rounding": True, "disable_rht": True, "disable_2d_quantization": True}),
])
def test_block_recipe_mapping(stand_in, spec, name, kwargs):
    module, recipes, _ = stand_in
    recipe = Policy.parse(f"bf16-mixed,fp8={spec}").fp8
    if not hasattr(module, "autocast"):  # TE 1.x: no block recipes; refused naming the TE version
        with pytest.raises(UnsupportedPolicyError, match=rf"has no {name} \(TE >= 2\.\d\).*engine=native"):
            te.te_recipe(recipe)
        assert not te.supports(recipe)
        return
    built = te.te_recipe(recipe)
    assert type(built) is getattr(recipes, name)
    expected = {k: getattr(recipes.Format, v) if k == "fp8_format" else v for k, v in kwargs.items()}
    assert built.kwargs == expected  # every switch passed, so NVTE_NVFP4_* variables cannot override it
    assert te.supports(recipe)


@pytest.mark.parametrize("spec, match", [
    ("rowwise", r"fp8=rowwise: torchao's row-wise recipe .*Float8BlockScaling.*fp8=rowwise\(engine=native\)"),
    ("rowwise_with_gw_hp", r"fp8=rowwise_with_gw_hp: .*engine=native"),
    ("mxfp8(rounding=floor)", r"fp8=mxfp8\(rounding=floor\): .*RCEIL.*engine=native"),
    ("mxfp8(rounding=ceil)", r"rounding=ceil.*engine=native"),
    ("mxfp8(rounding=even)", r"rounding=even.*engine=native"),
])
def test_options_te_lacks_are_refused_not_run_natively(stand_in, monkeypatch, spec, match):
    module, _, calls = stand_in
    recipe = Policy.parse(f"bf16-mixed,fp8={spec}").fp8
    with pytest.raises(UnsupportedPolicyError, match=match):
        te.te_recipe(recipe)
    assert not te.supports(recipe)
    # engine=te: refused, the model left as it was (it used to fall through to the native layers)
    forced = spec[:-1] + ",engine=te)" if "(" in spec else spec + "(engine=te)"
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(UnsupportedPolicyError, match=match):
        fp8.convert_module(model, Policy.parse(f"bf16-mixed,fp8={forced}"))
    assert type(model[0]) is nn.Linear and calls == []
    # engine=auto on a GPU where TE runs block recipes: the native engine runs it
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (10, 0))
    assert fp8.select_engine(recipe) == "native"


def test_auto_engine_for_block_recipes(stand_in, monkeypatch):
    module, _, _ = stand_in
    mxfp8, nvfp4 = (Policy.parse(f"bf16-mixed,fp8={s}").fp8 for s in ("mxfp8", "nvfp4"))
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (9, 0))  # Hopper: TE's MX/NVFP4 need Blackwell
    assert fp8.select_engine(mxfp8) == "native" and fp8.select_engine(nvfp4) == "native"
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (10, 0))
    expected = "transformer-engine" if hasattr(module, "autocast") else "native"  # TE 1.x lacks them
    assert fp8.select_engine(mxfp8) == expected and fp8.select_engine(nvfp4) == expected
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: None)
    assert fp8.select_engine(mxfp8) == "native"


def test_auto_engine_for_block_recipes_without_te(no_te, monkeypatch):
    monkeypatch.setattr(fp8, "_cuda_capability", lambda: (10, 0))
    for spec in ("rowwise", "mxfp8", "nvfp4"):
        recipe = Policy.parse(f"bf16-mixed,fp8={spec}").fp8
        assert fp8.select_engine(recipe) == "native"
        model = fp8.convert_module(nn.Sequential(nn.Linear(32, 32)), Policy.parse(f"bf16-mixed,fp8={spec}"))
        assert type(model[0]).__name__ == "BlockScaledLinear"


@pytest.mark.parametrize("spec, name, skipped", [("mxfp8", "MXFP8BlockScaling", {"odd", "narrow", "head"}),
                                                 ("nvfp4(sr=false)", "NVFP4BlockScaling", {"odd", "narrow"})])
def test_block_recipe_convert_module_runs_te_layers_under_the_recipe(stand_in, spec, name, skipped):
    module, recipes, calls = stand_in
    if not hasattr(module, "autocast"):
        pytest.skip("TE 1.x has no block recipes (refusal tested in test_block_recipe_mapping)")
    model = Net()
    with pytest.warns(UserWarning) as record:
        fp8.convert_module(model, Policy.parse(f"bf16-mixed,fp8={spec[:-1] + ',engine=te)' if '(' in spec else spec + '(engine=te)'}"))
    warned = {p for p in ("odd", "narrow", "head") if any(f"run {p} " in str(w.message) for w in record)}
    assert warned == skipped  # MXFP8 needs both weight dims % 32 (head is 16x16); NVFP4 % 16
    assert type(model.block[0]) is module.LayerNormLinear and type(model.block[3]) is module.Linear
    assert (type(model.head) is module.Linear) == ("head" not in skipped)
    model(torch.randn(8, 32))
    (entered,) = [c for c in calls if c[0] == "autocast"]
    assert type(entered[1]["recipe"]) is getattr(recipes, name)
    assert not any(type(m).__name__ == "BlockScaledLinear" for m in model.modules())


def test_one_te_recipe_per_model(stand_in):
    module, _, _ = stand_in
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.raises(UnsupportedPolicyError, match=r"one recipe per autocast; this policy has 2 "
                                                     r"\(current\(engine=transformer-engine\), "
                                                     r"delayed\(engine=transformer-engine\)\); use engine=native"):
        fp8.convert_module(model, Policy.parse("bf16-mixed,fp8=delayed(engine=te),@1=(fp8=current(engine=te))"))
    assert type(model[0]) is nn.Linear
