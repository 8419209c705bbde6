"""Exports to jmp, Keras and Fabric spellings, refusing to drop what the target cannot say."""

import pytest

from dualprec import Policy, PolicyError, presets
from dualprec.presets import PRESET_TABLE


@pytest.mark.parametrize("text,expected", [
    ("bf16-mixed", "p=f32,c=bf16,o=f32"), ("32-true", "p=f32,c=f32,o=f32"),
    ("mixed_bfloat16", "p=f32,c=bf16,o=bf16"), ("bfloat16", "p=bf16,c=bf16,o=bf16"),
    ("64-true", "p=f64,c=f64,o=f32"),
])
def test_to_jmp(text, expected):
    p = Policy.parse(text)
    assert p.to_jmp() == expected
    assert Policy.parse(expected) == p  # and back


def test_to_jmp_matches_jmp_itself():
    jmp = pytest.importorskip("jmp")
    import numpy as np

    for name, p in presets().items():
        try:
            s = p.to_jmp()
        except PolicyError:
            continue
        ref = jmp.get_policy(s)
        assert (p.param_dtype, p.compute_dtype, p.output_dtype) == tuple(
            np.dtype(d).name for d in (ref.param_dtype, ref.compute_dtype, ref.output_dtype)), name


def test_to_jmp_refuses_what_it_cannot_carry():
    with pytest.raises(PolicyError, match="loss_scale"):
        Policy.parse("16-mixed").to_jmp()
    assert Policy.parse("16-mixed").to_jmp(ignore=("loss_scale",)) == "p=f32,c=f16,o=f32"
    with pytest.raises(PolicyError, match="quantization"):
        Policy.parse("nf4").to_jmp()
    with pytest.raises(PolicyError, match="unknown field"):
        Policy.parse("nf4").to_jmp(ignore=("quant",))


@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16", "float32", "bfloat16", "float16",
                                  "float64", "int8_from_mixed_bfloat16", "float8_from_float32"])
def test_keras_round_trip(name):
    p = Policy.parse(name)
    assert p.to_keras() == name
    assert Policy.parse(p.to_keras()) == p


def test_keras_refuses():
    with pytest.raises(PolicyError, match="output_dtype"):
        Policy.parse("bf16-mixed").to_keras()  # Fabric outputs f32, Keras outputs the compute dtype
    assert Policy.parse("bf16-mixed").to_keras(ignore=("output_dtype",)) == "mixed_bfloat16"
    with pytest.raises(PolicyError, match="loss_scale"):
        Policy.parse("c=f16").to_keras()  # Keras mixed_float16 always scales the loss
    with pytest.raises(PolicyError, match="nf4"):
        Policy.parse("mixed_bfloat16,quant=nf4").to_keras()


def test_fabric_export():
    for row in PRESET_TABLE:
        if row.source in ("Lightning Fabric", "bitsandbytes"):
            assert row.policy.to_fabric() == row.name
            assert Policy.parse(row.policy.to_fabric()) == row.policy
    with pytest.raises(PolicyError, match="no Lightning Fabric precision"):
        Policy.parse("mixed_bfloat16").to_fabric()
    assert Policy.parse("bf16-mixed,@head=32-true").to_fabric(ignore=("overrides",)) == "bf16-mixed"
