"""Every invalid input is a PolicyError (a ValueError) naming the token and, where near, the fix."""

import pytest

from dualprec import FP8Recipe, LossScaleConfig, Policy, PolicyError, Quantization

BAD = [
    # unknown names, with suggestions
    ("bf16-mixd", 'did you mean "bf16-mixed"'),
    ("16-mixd", 'did you mean "16-mixed"'),
    ("mixed_bfloat", 'did you mean "mixed_bfloat16"'),
    ("nf5", 'did you mean "nf4"'),
    ("transformer-engin", 'did you mean "transformer-engine"'),
    ("qwerty", 'unknown policy "qwerty"'),
    ("fp16", "ambiguous"),
    ("", "empty policy"),
    ("   ", "empty policy"),
    # floats and malformed numbers
    ("16.0", "must be the ints 16, 32 or 64"),
    ("16-mixed,loss_scale=1e", "malformed number"),
    ("16-mixed,loss_scale=dynamic(init=abc)", "malformed number"),
    ("16-mixed,loss_scale=dynamic(interval=10.5)", "must be an integer"),
    ("nf4,quant=nf4(blocksize=sixty)", "malformed number"),
    # unknown keys / arguments / values
    ("params=f32,compte=bf16", 'unknown key "compte".*did you mean "compute"'),
    ("p=f32,c=bf17", 'unknown dtype "bf17".*did you mean "bf16"'),
    ("p=int8", 'unknown dtype "int8"'),
    ("16-mixed,loss_scale=dynamic(grwoth=2)", 'unknown argument "grwoth".*did you mean "growth"'),
    ("16-mixed,loss_scale=dinamic", 'did you mean "dynamic"'),
    ("bf16-mixed,quant=nf4(treshold=1)", 'did you mean "threshold"'),
    ("bf16-mixed,fp8=delayd", 'did you mean "delayed"'),
    ("bf16-mixed,fp8=delayed(engine=tensorrt)", "unknown engine"),
    ("bf16-mixed,fp8=delayed(format=e5m2)", "unknown format"),
    ("bf16-mixed,master=maybe", "use true or false"),
    # duplicate keys (also through aliases)
    ("p=f32,params=bf16", 'repeats "p"'),
    ("c=bf16,compute=bf16", 'repeats "c"'),
    ("16-mixed,loss_scale=dynamic(init=2,init_scale=4)", "given twice"),
    ("bf16-mixed,@x=32-true,@x=16-true", "given twice"),
    # structure
    ("p=f32,,c=bf16", "empty item"),
    ("p=f32,bf16-mixed", "not key=value"),
    ("16-mixed,loss_scale=dynamic(init=2", "unbalanced"),
    ("16-mixed,loss_scale=dynamic)", "unbalanced"),
    ("bf16-mixed,@=32-true", "non-empty"),
    ("bf16-mixed,@a,b=32-true", "not key=value"),
    ("bf16-mixed,@x=(@y=32-true)", 'unknown key "@y"'),
    # contradictions
    ("16-mixed,loss_scale=0", r"loss_scale\.init_scale=0\.0 is out of range: a float32 in \[2\*\*-126, 2\*\*126\]"),
    ("16-mixed,loss_scale=-4", r"loss_scale\.init_scale=-4\.0 is out of range"),
    ("16-mixed,loss_scale=dynamic(growth=1)", r"growth_factor=1\.0 is out of range: a number in \(1, 2\*\*126\]"),
    ("16-mixed,loss_scale=dynamic(growth=0.5)", r"growth_factor=0\.5 is out of range"),
    ("16-mixed,loss_scale=dynamic(backoff=1)", r"backoff_factor=1\.0 is out of range: a number in \[2\*\*-24, 1\)"),
    ("16-mixed,loss_scale=dynamic(backoff=0)", r"backoff_factor=0\.0 is out of range: a float32 in \[2\*\*-24, 1\)"),
    ("16-mixed,loss_scale=dynamic(interval=0)", r"growth_interval=0 is out of range: an int32 in \[1, 2\*\*31-1\]"),
    ("16-mixed,loss_scale=dynamic(min=2**20)", "min_scale"),
    ("16-mixed,loss_scale=dynamic(max=2)", "max_scale"),
    ("16-mixed,loss_scale=static(scale=4,growth=2)", "growth_factor does not apply to static"),
    ("bf16-mixed,fp8=current(history=1024)", "history_len does not apply to current"),
    ("16-true,quant=int8(blocksize=64)", "blocksize does not apply to int8"),
    ("bf16-true,quant=nf4(threshold=6)", "threshold does not apply to nf4"),
    ("16-mixed,loss_scale=static", "needs its scale"),
    ("p=f64,quant=nf4", "float64"),
    ("p=f32,c=f64,quant=nf4", "float64"),
    ("p=f64,fp8=delayed", "float64"),
    ("p=f32,c=f64,fp8=current", "float64"),
    ("32-true,quant=int8", "LLM.int8"),
    ("bf16-mixed,quant=nf4(blocksize=100)", "blocksize 100 is not supported"),
    ("bf16-mixed,quant=nf4(blocksize=8192)", "blocksize 8192"),
    ("16-true,quant=int8(blocksize=128)", "blocksize does not apply"),
    ("bf16-mixed,quant=nf4(threshold=3)", "threshold does not apply"),
    ("bf16-mixed,fp8=current(history=16)", "does not apply to current"),
    ("bf16-mixed,fp8=delayed(history=0)", r"fp8\.history_len=0 is out of range: an int32 in \[1, 65536\]"),
    ("32-true,master=true", "float32 already"),
    ("16-true,loss_scale=dynamic", "float16 gradients"),
    ("16-mixed,@head=(loss_scale=static(8))", "loss scaling is global"),
    ("bf16-mixed,@head=16-mixed", "loss scaling is global"),
    ("int4_from_mixed_bfloat16", "per-channel int4"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_strings(text, message):
    with pytest.raises(PolicyError, match=message) as info:
        Policy.parse(text)
    assert isinstance(info.value, ValueError)


def test_int8_accepts_bf16_and_f16_compute_only():
    assert Policy.parse("bf16-mixed,quant=int8").quantization.mode == "int8"  # bf16 activations are fine
    assert Policy.parse("16-true,quant=int8-training").compute_dtype == "float16"
    with pytest.raises(PolicyError, match="compute=float32"):
        Policy.parse("32-true,quant=int8-training")


@pytest.mark.parametrize("value,message", [
    (16.0, "did you mean 16"), (32.5, "is a float"), (8, "not a Fabric precision"), (True, "bool"),
    (None, "cannot make a policy"), ([16], "cannot make a policy"), (b"bf16", "cannot make a policy"),
])
def test_bad_python_values(value, message):
    with pytest.raises(PolicyError, match=message):
        Policy.parse(value)


@pytest.mark.parametrize("data,message", [
    ({"schema_version": 1, "loss_scale": {"kind": "dynamic", "growht_factor": 2}}, 'did you mean "growth_factor"'),
    ({"schema_version": 1, "quantization": {"blocksize": 64}}, "needs 'mode'"),
    ({"schema_version": 1, "overrides": [{"pattern": "x"}]}, "needs pattern and policy"),
    ({"schema_version": 1, "overrides": {"x": "32-true"}}, "must be a list"),
    ({"schema_version": "1"}, "positive int"),
    ({"schema_version": 1, "param_dtype": "int32"}, 'unknown dtype "int32"'),
    ({"schema_version": 1, "master_weights": "yes"}, "true or false"),
    ({"schema_version": 1, "loss_scale": {"kind": "static", "init_scale": "big"}}, "must be a number"),
])
def test_bad_dicts(data, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict(data)


def test_component_constructors_validate():
    with pytest.raises(PolicyError, match="settings were given but kind is none"):
        LossScaleConfig(init_scale=4.0)
    with pytest.raises(PolicyError, match="unknown mode"):
        Quantization("nf3")
    with pytest.raises(PolicyError, match="contains"):
        Quantization("nf4", skip=("a,b",))
    with pytest.raises(PolicyError, match="growth/backoff/interval/min/max apply to dynamic"):
        LossScaleConfig("static", init_scale=8.0, growth_interval=10)
    with pytest.raises(PolicyError, match="blocksize applies to 4-bit"):
        Quantization("int8", blocksize=128)
    with pytest.raises(PolicyError, match="threshold is the LLM.int8"):
        Quantization("nf4", threshold=1.0)
    with pytest.raises(PolicyError, match="belong to delayed scaling"):
        FP8Recipe("current", history_len=16)
    with pytest.raises(PolicyError, match="has overrides of its own"):
        Policy(overrides={"a": Policy(overrides={"b": Policy()})})


def test_errors_never_leak_other_exception_types():
    # A sweep over mangled versions of valid strings: each either parses or raises PolicyError.
    valid = ["params=f32,compute=bf16,output=f32,quant=nf4-dq,loss_scale=dynamic(init=2**15)",
             "bf16-mixed,@lm_head=(compute=float32),fp8=delayed(history=16)"]
    for s in valid:
        for i in range(len(s)):
            for mangled in (s[:i], s[:i] + s[i + 1:], s[:i] + "(" + s[i:], s[:i] + "=" + s[i:]):
                try:
                    Policy.parse(mangled)
                except PolicyError:
                    pass
