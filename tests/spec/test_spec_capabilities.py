"""The spec decides what a device can run; backends only describe the device."""

import pytest

from dualprec import DeviceCaps, Policy, PolicyError

V100 = DeviceCaps("cuda", "V100", (7, 0), bitsandbytes=True)
A100 = DeviceCaps("cuda", "A100", (8, 0), bitsandbytes=True)
L4 = DeviceCaps("cuda", "L4", (8, 9), transformer_engine=True)
H100 = DeviceCaps("cuda", "H100", (9, 0), backend="torch", bitsandbytes=True, transformer_engine=True)
CPU = DeviceCaps("cpu", backend="torch")


def test_bf16_needs_ampere_with_fp16_fallback():
    r = Policy.parse("bf16-mixed").check(V100)
    assert not r.ok and "8.0" in r.problems[0].message
    assert r.fallback == Policy.parse("16-mixed")  # fp16 autocast needs the loss scaler
    assert Policy.parse("bf16-true").check(V100).fallback == Policy.parse("16-true")
    assert Policy.parse("bf16-mixed").check(A100).ok
    with pytest.raises(PolicyError, match="cannot run here.*Fallback: \"16-mixed\""):
        Policy.parse("bf16-mixed").check(V100).raise_if_unrunnable()


def test_fp8_needs_ada_or_hopper():
    p = Policy.parse("bf16-mixed,fp8=delayed(engine=native)")
    assert not p.check(A100).ok and p.check(A100).fallback == Policy.parse("bf16-mixed")
    assert p.check(L4).ok and p.check(H100).ok
    cpu = p.check(CPU)
    assert cpu.ok and any("emulated" in n.message for n in cpu.notes)


def test_transformer_engine_engine_resolution():
    te = Policy.parse("transformer-engine")
    assert te.check(H100).ok
    r = te.check(CPU)
    assert not r.ok and r.fallback.fp8.engine == "native"
    auto = Policy.parse("bf16-true,fp8=delayed")
    assert any("transformer-engine" in n.message for n in auto.check(H100).notes)
    assert any("native" in n.message for n in auto.check(A100.__class__("cuda", "L40", (8, 9))).notes)


def test_fp16_on_cpu_and_old_torch():
    r = Policy.parse("16-mixed").check(CPU)
    assert r.ok and any("float16 on CPU" in n.message for n in r.notes)
    old = DeviceCaps("cpu", backend="torch", fp16_autocast=False)
    assert Policy.parse("16-mixed").check(old).fallback == Policy.parse("params=f32,compute=bf16,output=f32,"
                                                                       "loss_scale=dynamic")


def test_bitsandbytes_needed_by_torch_only():
    no_bnb = DeviceCaps("cpu", backend="torch", bitsandbytes=False)
    r = Policy.parse("nf4").check(no_bnb)
    assert not r.ok and r.fallback is None and "dualprec[bnb]" in r.problems[0].message
    assert Policy.parse("nf4").check(DeviceCaps("cpu", backend="jax")).ok


def test_float64():
    assert not Policy.parse("64-true").check(DeviceCaps("tpu")).ok
    notes = Policy.parse("64-true").check(DeviceCaps("cpu", backend="jax")).notes
    assert any("jax_enable_x64" in n.message for n in notes)


def test_overrides_are_checked_too():
    p = Policy.parse("16-mixed,@head=(compute=bfloat16)")
    r = p.check(V100)
    assert not r.ok and r.fallback.for_module("head").compute_dtype == "float16"


def test_bad_caps():
    with pytest.raises(PolicyError, match="compute_capability"):
        DeviceCaps("cuda")
    with pytest.raises(PolicyError, match="platform"):
        DeviceCaps("gpu")
    with pytest.raises(PolicyError, match="DeviceCaps"):
        Policy.parse("bf16-mixed").check("cuda")


def test_block_recipes_and_transformer_engine():
    from dualprec.capabilities import resolve_fp8_engine

    b200 = DeviceCaps("cuda", "B200", (10, 0), backend="torch", transformer_engine=True)
    # auto: TE only where TE has the recipe with every option, on a GPU it runs it on
    assert resolve_fp8_engine(Policy.parse("bf16-mixed,fp8=mxfp8"), b200) == "transformer-engine"
    assert resolve_fp8_engine(Policy.parse("bf16-mixed,fp8=nvfp4(sr=false)"), b200) == "transformer-engine"
    assert resolve_fp8_engine(Policy.parse("bf16-mixed,fp8=mxfp8"), H100) == "native"
    assert resolve_fp8_engine(Policy.parse("bf16-mixed,fp8=mxfp8(rounding=floor)"), b200) == "native"
    assert resolve_fp8_engine(Policy.parse("bf16-mixed,fp8=rowwise"), b200) == "native"
    assert resolve_fp8_engine(Policy.parse("bf16-mixed,fp8=delayed"), H100) == "transformer-engine"
    # forced: a refusal naming the option or the capability, and the native engine as fallback
    r = Policy.parse("bf16-mixed,fp8=mxfp8(rounding=floor,engine=te)").check(b200)
    assert not r.ok and "rounds block scales up (RCEIL)" in r.problems[0].message
    assert r.fallback.fp8.engine == "native" and r.fallback.fp8.rounding == "floor"
    r = Policy.parse("bf16-mixed,fp8=nvfp4(engine=te)").check(H100)
    assert not r.ok and "NVFP4BlockScaling on compute capability >= 10.0; H100 has 9.0" in r.problems[0].message
    assert Policy.parse("bf16-mixed,fp8=nvfp4(engine=te)").check(b200).ok
    assert not Policy.parse("bf16-mixed,fp8=rowwise(engine=te)").check(b200).ok
