"""The block-scaled / row-wise recipes in the Policy grammar: names, canonical strings, errors."""

import json

import pytest

from dualprec import FP8Recipe, Policy, PolicyError
from dualprec.errors import UnsupportedPolicyError


@pytest.mark.parametrize("text, canonical_fp8", [
    ("fp8=rowwise", "rowwise"),
    ("fp8=ROWWISE_WITH_GW_HP", "rowwise_with_gw_hp"),
    ("fp8=mxfp8", "mxfp8(rounding=rceil)"),                 # the variant is always named
    ("fp8=mxfp8(rounding=floor)", "mxfp8(rounding=floor)"),
    ("fp8=mxfp8(scale_rounding=Even, format=hybrid)", "mxfp8(format=hybrid,rounding=even)"),
    ("fp8=nvfp4", "nvfp4(sr=true,rht=true,wblocks=16x16)"),
    ("fp8=nvfp4(sr=off,hadamard=no,weight_blocks=1x16)", "nvfp4(sr=false,rht=false,wblocks=1x16)"),
    ("fp8=nvfp4(stochastic_rounding=1,rht=0)", "nvfp4(sr=true,rht=false,wblocks=16x16)"),
])
def test_block_recipes_parse_to_canonical_names(text, canonical_fp8):
    p = Policy.parse("bf16-mixed," + text)
    assert str(p).endswith(",fp8=" + canonical_fp8)
    assert Policy.parse(str(p)) == p
    assert Policy.from_json(p.to_json()) == p
    assert p.fp8.block_scaled


def test_defaults_resolve_per_recipe():
    assert FP8Recipe("mxfp8").rounding == "rceil" and FP8Recipe("mxfp8").format == "e4m3"
    n = FP8Recipe("nvfp4")
    assert (n.sr, n.rht, n.weight_blocks, n.format) == (True, True, "16x16", "e2m1")
    assert FP8Recipe("rowwise").format == "e4m3"
    # per-tensor recipes keep their old defaults and dict form
    assert FP8Recipe("delayed").format == "hybrid" and FP8Recipe("delayed").rounding is None
    assert FP8Recipe("delayed").to_dict() == {"scaling": "delayed", "history_len": 1024, "margin": 0,
                                              "amax_algo": "max", "format": "hybrid", "engine": "auto"}
    assert FP8Recipe("mxfp8") == FP8Recipe("mxfp8", rounding="rceil")
    assert FP8Recipe("mxfp8", rounding="floor") != FP8Recipe("mxfp8")
    assert not FP8Recipe("current").block_scaled


def test_dict_form_names_every_option():
    d = Policy.parse("bf16-mixed,fp8=nvfp4(sr=false)").to_dict()["fp8"]
    assert d == {"scaling": "nvfp4", "format": "e2m1", "engine": "auto", "sr": False, "rht": True,
                 "weight_blocks": "16x16"}
    json.dumps(d)


@pytest.mark.parametrize("text, message", [
    ("fp8=mxfp8(rounding=up)", 'unknown mxfp8 rounding "up"'),
    ("fp8=rowwise(rounding=floor)", "rounding .* applies to mxfp8, not rowwise"),
    ("fp8=current(sr=true)", "sr applies to nvfp4, not current"),
    ("fp8=nvfp4(format=e4m3)", 'unknown format "e4m3" for nvfp4'),
    ("fp8=rowwise(format=hybrid)", 'unknown format "hybrid" for rowwise'),
    ("fp8=mxfp8(history=4)", "belong to delayed scaling"),
    ("fp8=nvfp4(sr=maybe)", 'fp8.sr="maybe": use true or false'),
    ("fp8=nvfp4(wblocks=32x32)", "weight_blocks"),
    ("fp8=mxfp4", 'did you mean "mxfp8"'),
])
def test_block_recipe_errors_are_one_line(text, message):
    with pytest.raises(PolicyError, match=message) as e:
        Policy.parse("bf16-mixed," + text)
    assert "\n" not in str(e.value)


def test_nonbool_options_rejected_from_python():
    with pytest.raises(PolicyError, match="true or false"):
        FP8Recipe("nvfp4", sr="yes")


def test_backends_route_or_refuse_block_recipes():
    torch = pytest.importorskip("torch")
    from dualprec_torch import fp8 as tfp8
    from dualprec_torch.blockscale import BlockScaledLinear, layer_seed

    with pytest.raises(UnsupportedPolicyError, match="fp8=nvfp4"):
        tfp8.FP8Linear(16, 16, recipe=FP8Recipe("nvfp4"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left as they are" warning for the converted layers
        tfp8.convert_module(model, Policy.parse("bf16-mixed,fp8=mxfp8,@2=(fp8=nvfp4(sr=false))"))
    assert isinstance(model[0], BlockScaledLinear) and model[0].recipe == FP8Recipe("mxfp8")
    assert model[2].recipe == FP8Recipe("nvfp4", sr=False)
    assert model[2].blockscale_state.tolist() == [layer_seed("2"), 0]
    pytest.importorskip("jax")
    from dualprec_jax import fp8 as jfp8

    with pytest.raises(UnsupportedPolicyError, match="fp8=rowwise"):
        jfp8.init_meta(FP8Recipe("rowwise"))
