"""Every spelling users already have parses with its original library's meaning."""

import pytest

from dualprec import FP8Recipe, LossScaleConfig, Policy, PolicyError, Quantization, presets
from dualprec.presets import PRESET_TABLE, lookup_preset


def dt(p):
    return (p.param_dtype, p.compute_dtype, p.output_dtype, p.reduce_dtype)


# (spelling, (param, compute, output, reduce), loss-scale kind) — Fabric converts outputs to
# its default dtype (float32); jmp and Keras keep outputs in the compute dtype.
FABRIC = [
    ("32-true", ("float32",) * 4, "none"),
    ("64-true", ("float64", "float64", "float32", "float64"), "none"),
    ("16-true", ("float16", "float16", "float32", "float16"), "none"),
    ("bf16-true", ("bfloat16", "bfloat16", "float32", "bfloat16"), "none"),
    ("16-mixed", ("float32", "float16", "float32", "float32"), "dynamic"),
    ("bf16-mixed", ("float32", "bfloat16", "float32", "float32"), "none"),
    (16, ("float32", "float16", "float32", "float32"), "dynamic"),
    (32, ("float32",) * 4, "none"),
    (64, ("float64", "float64", "float32", "float64"), "none"),
    ("16", ("float32", "float16", "float32", "float32"), "dynamic"),
    ("32", ("float32",) * 4, "none"),
    ("64", ("float64", "float64", "float32", "float64"), "none"),
    ("bf16", ("float32", "bfloat16", "float32", "float32"), "none"),
]


@pytest.mark.parametrize("spelling,dtypes,ls", FABRIC)
def test_fabric_spellings(spelling, dtypes, ls):
    p = Policy.parse(spelling)
    assert dt(p) == dtypes
    assert p.loss_scale.kind == ls
    assert p.quantization is None and p.fp8 is None


def test_fabric_16_mixed_uses_gradscaler_defaults():
    ls = Policy.parse("16-mixed").loss_scale
    assert (ls.init_scale, ls.growth_factor, ls.backoff_factor, ls.growth_interval) == (65536.0, 2.0, 0.5, 2000)
    assert ls.min_scale is None and ls.max_scale is None


@pytest.mark.parametrize("name,weights", [("transformer-engine", "bfloat16"),
                                          ("transformer-engine-float16", "float16")])
def test_fabric_transformer_engine(name, weights):
    p = Policy.parse(name)
    assert p.param_dtype == p.compute_dtype == weights
    # Fabric builds DelayedScaling() with TE's defaults: HYBRID, history 1024, max, margin 0.
    assert p.fp8 == FP8Recipe("delayed", history_len=1024, margin=0, amax_algo="max", format="hybrid",
                              engine="transformer-engine")


@pytest.mark.parametrize("mode,compute", [("nf4", "bfloat16"), ("nf4-dq", "bfloat16"), ("fp4", "bfloat16"),
                                          ("fp4-dq", "bfloat16"), ("int8", "float16"),
                                          ("int8-training", "float16")])
def test_bitsandbytes_modes(mode, compute):
    p = Policy.parse(mode)
    q = p.quantization
    assert q.mode == mode and p.compute_dtype == compute
    assert q.double_quant == mode.endswith("-dq")
    assert q.quant_type == mode.split("-")[0]
    if q.is_4bit:
        assert q.blocksize == 64
    else:
        assert q.threshold == 6.0  # Fabric's Linear8bitLt threshold


# jmp's cascade: params default f32, compute follows params, output follows compute.
JMP = [
    ("params=float32,compute=bfloat16,output=float32", ("float32", "bfloat16", "float32")),
    ("p=f32,c=bf16,o=f32", ("float32", "bfloat16", "float32")),
    ("c=bf16", ("float32", "bfloat16", "bfloat16")),
    ("c=f16", ("float32", "float16", "float16")),
    ("p=f16,c=f16", ("float16", "float16", "float16")),
    ("p=f16,c=bf16", ("float16", "bfloat16", "bfloat16")),
    ("p=bf16", ("bfloat16", "bfloat16", "bfloat16")),
    ("o=bf16", ("float32", "float32", "bfloat16")),
    ("half", ("float16",) * 3),
    ("full", ("float32",) * 3),
    ("f32", ("float32",) * 3),
    ("f16", ("float16",) * 3),
    ("bfloat16", ("bfloat16",) * 3),
    ("float16", ("float16",) * 3),
    ("f64", ("float64",) * 3),
]


@pytest.mark.parametrize("spelling,dtypes", JMP)
def test_jmp_spellings(spelling, dtypes):
    assert dt(Policy.parse(spelling))[:3] == dtypes


@pytest.mark.parametrize("spelling", [s for s, _ in JMP if s != "half"])
def test_jmp_spellings_agree_with_jmp_itself(spelling):
    jmp = pytest.importorskip("jmp")
    import numpy as np

    ref = jmp.get_policy(spelling)
    p = Policy.parse(spelling)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == tuple(
        np.dtype(d).name for d in (ref.param_dtype, ref.compute_dtype, ref.output_dtype))


def test_bf16_is_fabric_meaning_not_jmp():
    # Fabric's alias wins over jmp's all-bf16 reading; jmp users write "bfloat16" or "p=bf16".
    assert Policy.parse("bf16") == Policy.parse("bf16-mixed")
    assert Policy.parse("bfloat16") != Policy.parse("bf16")


KERAS = [
    ("mixed_bfloat16", ("float32", "bfloat16", "bfloat16"), "none"),
    ("mixed_float16", ("float32", "float16", "float16"), "dynamic"),
    ("float32", ("float32",) * 3, "none"),
    ("bfloat16", ("bfloat16",) * 3, "none"),
    ("float16", ("float16",) * 3, "none"),
]


@pytest.mark.parametrize("name,dtypes,ls", KERAS)
def test_keras_names(name, dtypes, ls):
    p = Policy.parse(name)
    assert dt(p)[:3] == dtypes and p.loss_scale.kind == ls


def test_keras_mixed_float16_loss_scale_is_keras_default():
    ls = Policy.parse("mixed_float16").loss_scale
    assert ls.init_scale == 2.0**15 and ls.growth_interval == 1000


def test_keras_quantized_names():
    p = Policy.parse("int8_from_mixed_bfloat16")
    assert dt(p)[:3] == ("float32", "bfloat16", "bfloat16")
    assert p.quantization == Quantization("int8", threshold=0.0)
    f = Policy.parse("float8_from_bfloat16")
    assert f.fp8 == FP8Recipe("delayed") and f.param_dtype == "bfloat16"
    with pytest.raises(PolicyError, match="int4"):
        Policy.parse("int4_from_float32")


def test_explicit_form_with_everything():
    p = Policy.parse("params=f32,compute=bf16,output=f32,quant=nf4-dq,"
                     "loss_scale=dynamic(init=2**15,growth=4,backoff=0.25,interval=100,min=1,max=2**20),"
                     "fp8=delayed(history=16,margin=1,algo=most_recent,engine=native),reduce=bf16,"
                     "@lm_head=32-true,@blocks.*.norm=(compute=float32)")
    assert dt(p) == ("float32", "bfloat16", "float32", "bfloat16")
    assert p.loss_scale == LossScaleConfig("dynamic", 2.0**15, 4.0, 0.25, 100, 1.0, 2.0**20)
    assert p.quantization == Quantization("nf4-dq")
    assert p.fp8 == FP8Recipe("delayed", 16, 1, "most_recent", "hybrid", "native")
    head = p.for_module("lm_head")
    assert head.quantization is None and head.fp8 is None and head.compute_dtype == "float32"
    assert head.loss_scale == p.loss_scale  # loss scaling is global
    norm = p.for_module("blocks.3.norm")
    assert norm.compute_dtype == "float32" and norm.quantization == p.quantization
    assert p.for_module("blocks.3.mlp").compute_dtype == "bfloat16"
    assert p.for_module("lm_head.proj").compute_dtype == "float32"  # children inherit


def test_base_preset_plus_changes():
    p = Policy.parse("bf16-mixed,quant=nf4(blocksize=128,skip=lm_head|embed*)")
    assert dt(p) == dt(presets()["bf16-mixed"])
    assert p.quantization == Quantization("nf4", blocksize=128, skip=("lm_head", "embed*"))
    assert not p.quantizes("lm_head") and not p.quantizes("embed_tokens") and p.quantizes("blocks.0.fc")
    # With a base there is no jmp cascade: only the listed field changes.
    q = Policy.parse("bf16-mixed,compute=f16")
    assert (q.output_dtype, q.loss_scale.kind) == ("float32", "none")


def test_override_first_match_wins_and_empty_group_shields():
    p = Policy.parse("bf16-true,@head.norm=(),@head=32-true")
    assert p.for_module("head.norm").param_dtype == "bfloat16"
    assert p.for_module("head.fc").param_dtype == "float32"
    assert Policy.parse(str(p)) == p


def test_static_loss_scale_spellings():
    for s in ("16-mixed,loss_scale=1024", "16-mixed,loss_scale=static(1024)", "16-mixed,ls=static(scale=2**10)"):
        assert Policy.parse(s).loss_scale == LossScaleConfig("static", init_scale=1024.0)
    assert Policy.parse("16-mixed,loss_scale=none").loss_scale == LossScaleConfig()


def test_parse_accepts_policy_and_dict():
    p = Policy.parse("16-mixed")
    assert Policy.parse(p) is p
    assert Policy.parse(p.to_dict()) == p


def test_case_and_whitespace_tolerated_for_names_not_patterns():
    assert Policy.parse("  BF16-Mixed \n") == Policy.parse("bf16-mixed")
    assert Policy.parse(" P = F32 , C = BF16 ") == Policy.parse("p=f32,c=bf16")
    assert Policy.parse("Mixed_BFloat16") == Policy.parse("mixed_bfloat16")
    p = Policy.parse("bf16-mixed, @LM_Head = 32-true")
    assert p.overrides[0][0] == "LM_Head"
    assert p.for_module("LM_Head").compute_dtype == "float32"
    assert p.for_module("lm_head").compute_dtype == "bfloat16"  # module paths are case-sensitive


def test_dtype_objects_are_accepted():
    np = pytest.importorskip("numpy")
    import ml_dtypes

    p = Policy(param_dtype=np.float32, compute_dtype=ml_dtypes.bfloat16)
    assert (p.param_dtype, p.compute_dtype) == ("float32", "bfloat16")
    torch = pytest.importorskip("torch")
    assert Policy(param_dtype=torch.bfloat16).param_dtype == "bfloat16"
    jnp = pytest.importorskip("jax.numpy")
    assert Policy(compute_dtype=jnp.float16).compute_dtype == "float16"


def test_policy_is_frozen_and_hashable():
    p = Policy.parse("bf16-mixed,@x=32-true")
    with pytest.raises(Exception):
        p.param_dtype = "float16"
    assert len({p, Policy.parse(str(p)), Policy.parse("bf16-mixed")}) == 2


def test_presets_table_names_unique_and_listed():
    names = [r.name for r in PRESET_TABLE]
    assert list(presets()) == names
    for r in PRESET_TABLE:
        for alias in (r.name,) + r.aliases:
            assert lookup_preset(alias) is r
            assert Policy.parse(alias) == r.policy
        assert str(r.policy) == r.name
