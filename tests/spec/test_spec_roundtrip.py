"""One canonical string per policy, and lossless dict / JSON / TOML round trips."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualprec import FP8Recipe, LossScaleConfig, Policy, PolicyError, Quantization, presets
from dualprec.policy import (
    BLOCKSIZES,
    FP8_ENGINES,
    FP8_FORMATS,
    MX_ROUNDINGS,
    NONFINITE_RULES,
    NVFP4_WEIGHT_BLOCKS,
    QUANT_MODES,
)

DTYPES = ("float64", "float32", "bfloat16", "float16")
patterns = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.(\*|[0-9]|[a-z]{1,4})){0,2}", fullmatch=True)
scales = st.sampled_from([1.0, 0.5, 3.0, 1024.0, 2.0**15, 2.0**16, 2.0**24, 1e-3, 12345.678])


@st.composite
def loss_scales(draw):
    kind = draw(st.sampled_from(["none", "static", "dynamic"]))
    if kind == "none":
        return LossScaleConfig()
    init = draw(scales)
    if kind == "static":
        return LossScaleConfig("static", init_scale=init)
    lo = draw(st.none() | st.sampled_from([init, init / 4]))
    hi = draw(st.none() | st.sampled_from([init, init * 8]))
    return LossScaleConfig("dynamic", init, draw(st.sampled_from([2.0, 1.5, 4.0])),
                     draw(st.sampled_from([0.5, 0.25, 0.9])), draw(st.integers(1, 5000)), lo, hi)


@st.composite
def quants(draw):
    mode = draw(st.sampled_from(QUANT_MODES))
    skip = tuple(draw(st.lists(patterns, max_size=2, unique=True)))
    if mode.startswith("int8"):
        return Quantization(mode, threshold=draw(st.sampled_from([6.0, 0.0, 3.5])), skip=skip)
    return Quantization(mode, blocksize=draw(st.sampled_from(BLOCKSIZES)), skip=skip)


@st.composite
def fp8s(draw):
    engine = draw(st.sampled_from(FP8_ENGINES))
    fmt = draw(st.sampled_from(FP8_FORMATS))
    kind = draw(st.sampled_from(["current", "delayed", "rowwise", "rowwise_with_gw_hp", "mxfp8", "nvfp4"]))
    if kind == "current":
        return FP8Recipe("current", format=fmt, engine=engine)
    if kind.startswith("rowwise"):
        return FP8Recipe(kind, engine=engine)
    if kind == "mxfp8":
        return FP8Recipe("mxfp8", format=fmt, engine=engine, rounding=draw(st.sampled_from(MX_ROUNDINGS)))
    if kind == "nvfp4":
        return FP8Recipe("nvfp4", engine=engine, sr=draw(st.booleans()), rht=draw(st.booleans()),
                         weight_blocks=draw(st.sampled_from(NVFP4_WEIGHT_BLOCKS)))
    return FP8Recipe("delayed", draw(st.integers(1, 2048)), draw(st.integers(0, 3)),
                     draw(st.sampled_from(["max", "most_recent"])), fmt, engine)


@st.composite
def policies(draw, allow_overrides=True):
    """Random valid policies: draw fields, keep those the validator accepts."""
    for _ in range(50):
        try:
            param = draw(st.sampled_from(DTYPES))
            kwargs = dict(param_dtype=param, compute_dtype=draw(st.sampled_from(DTYPES)),
                          output_dtype=draw(st.sampled_from(DTYPES)),
                          reduce_dtype=draw(st.sampled_from(DTYPES)), loss_scale=draw(loss_scales()),
                          quantization=draw(st.none() | quants()), fp8=draw(st.none() | fp8s()),
                          master_weights=draw(st.booleans()) if param in ("bfloat16", "float16") else False,
                          nonfinite=draw(st.sampled_from((None,) + NONFINITE_RULES)))
            p = Policy(**kwargs)
            if allow_overrides:
                subs = draw(st.lists(st.tuples(patterns, policies(allow_overrides=False)), max_size=2,
                                     unique_by=lambda t: t[0]))
                p = p.replace(overrides=tuple((pat, sub.replace(loss_scale=LossScaleConfig(), nonfinite=None))
                                               for pat, sub in subs))
            return p
        except PolicyError:
            continue
    return Policy()


@settings(max_examples=300, deadline=None)
@given(policies())
def test_canonical_string_round_trips(p):
    s = str(p)
    assert Policy.parse(s) == p
    assert str(Policy.parse(s)) == s  # canonical: formatting is a fixed point


@settings(max_examples=200, deadline=None)
@given(policies())
def test_dict_and_json_round_trip(p):
    d = p.to_dict()
    assert d["schema_version"] == 1
    assert Policy.from_dict(d) == p
    assert Policy.from_json(p.to_json()) == p
    assert Policy.from_dict(json.loads(json.dumps(d))) == p


@pytest.mark.parametrize("name", list(presets()))
def test_presets_are_their_own_canonical_names(name):
    assert str(Policy.parse(name)) == name


def test_explicit_canonical_form_is_stable():
    p = Policy.parse("c=bf16,o=f32,q=nf4-dq,ls=dynamic(init=32768)")
    assert str(p) == "params=float32,compute=bfloat16,output=float32,loss_scale=dynamic(init=2**15),quant=nf4-dq"


@settings(max_examples=60, deadline=None)
@given(policies())
def test_file_round_trip(tmp_path_factory, p):
    d = tmp_path_factory.mktemp("policy")
    for suffix in (".json", ".toml"):
        path = d / f"policy{suffix}"
        p.save(path)
        assert Policy.load(path) == p


def test_load_string_documents_and_pyproject(tmp_path):
    (tmp_path / "a.toml").write_text('policy = "bf16-mixed,quant=nf4"\n')
    assert Policy.load(tmp_path / "a.toml") == Policy.parse("bf16-mixed,quant=nf4")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.dualprec]\npolicy = "16-mixed"\n')
    assert Policy.load(tmp_path / "pyproject.toml") == Policy.parse("16-mixed")
    (tmp_path / "b.json").write_text('{"policy": "bf16-true"}')
    assert Policy.load(tmp_path / "b.json") == Policy.parse("bf16-true")


def test_load_rejects_bad_documents(tmp_path):
    cases = {
        "newer.json": ('{"schema_version": 99, "param_dtype": "float32"}', "newer dualprec"),
        "noversion.json": ('{"param_dtype": "float32"}', "schema_version"),
        "typo.json": ('{"schema_version": 1, "param_dtyp": "float32"}', 'did you mean "param_dtype"'),
        "bad.json": ("{not json", "not valid JSON"),
        "bad.toml": ("x = = 1", "not valid TOML"),
        "code.json": ('{"policy": "__import__(\\"os\\").system(\\"true\\")"}', "unknown policy"),
        "p.yaml": ("a: 1", "unknown suffix"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PolicyError, match=msg):
            Policy.load(tmp_path / name)
    with pytest.raises(PolicyError, match="no such file"):
        Policy.load(tmp_path / "missing.json")


@pytest.mark.parametrize("text, rule, stored", [
    ("bf16-mixed", "apply", None), ("16-mixed", "skip", None), ("bf16-mixed,nonfinite=apply", "apply", None),
    ("16-mixed,nonfinite=skip", "skip", None), ("bf16-mixed,nonfinite=skip", "skip", "skip"),
    ("16-mixed,nonfinite=raise", "raise", "raise"), ("32-true,nan=RAISE", "raise", "raise")])
def test_nonfinite_rule_defaults_and_spellings(text, rule, stored):
    p = Policy.parse(text)
    assert (p.nonfinite_rule, p.nonfinite) == (rule, stored)
    assert Policy.parse(str(p)) == p and Policy.from_dict(p.to_dict()) == p


def test_nonfinite_is_global_and_checked():
    p = Policy.parse("bf16-mixed,nonfinite=raise,@head=32-true")
    assert p.for_module("head.proj").nonfinite_rule == "raise"
    with pytest.raises(PolicyError, match="must skip the step"):
        Policy.parse("16-mixed,nonfinite=apply")
    with pytest.raises(PolicyError, match='did you mean "skip"'):
        Policy.parse("bf16-mixed,nonfinite=skp")
    with pytest.raises(PolicyError, match="global"):
        Policy.parse("bf16-mixed,@head=(nonfinite=raise)")


def test_policies_lists_the_top_level_policy_then_each_override():
    p = Policy.parse("bf16-mixed,@head=32-true,@embed=(quant=nf4)")
    listed = p.policies()
    assert [pat for pat, _ in listed] == ["", "head", "embed"]
    assert listed[0][1] == p.replace(overrides=()) and listed[1][1] == p.for_module("head")
    assert p.dtypes() == {"float32", "bfloat16"}
