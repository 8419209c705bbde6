"""The torch and JAX Precision classes implement one interface: same names, same constructor,
and every name only one side has is listed, with its reason, in contract.FRAMEWORK_SPECIFIC."""

import inspect

import pytest

import dualprec_jax
import dualprec_torch
from dualprec import contract
from dualprec.errors import UnsupportedPolicyError

torch_precision = dualprec_torch.Precision
jax_precision = dualprec_jax.Precision
BACKENDS = {"torch": torch_precision, "jax": jax_precision}


def public_names(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_both_backends_implement_the_contract():
    for cls in BACKENDS.values():
        assert issubclass(cls, contract.Precision)
        assert not getattr(cls, "__abstractmethods__", None), cls.__abstractmethods__


def test_a_name_on_one_side_only_is_listed_with_a_reason():
    torch_names, jax_names = public_names(torch_precision), public_names(jax_precision)
    for side, own, other in (("torch", torch_names, jax_names), ("jax", jax_names, torch_names)):
        listed = contract.FRAMEWORK_SPECIFIC[side]
        unlisted = sorted(own - other - set(listed))
        assert not unlisted, (f"dualprec_{side}.Precision has {unlisted}, the other backend has not: add the "
                              f"name there or explain it in contract.FRAMEWORK_SPECIFIC[{side!r}]")
        stale = sorted(n for n in listed if n not in own or n in other)
        assert not stale, f"FRAMEWORK_SPECIFIC[{side!r}] lists {stale}, which is not {side}-only (any more)"
        assert all(reason.strip() for reason in listed.values())


def test_the_contract_names_are_on_both_sides():
    shared = public_names(contract.Precision) - {"register"}
    for cls in BACKENDS.values():
        assert shared <= public_names(cls)


def test_same_constructor_policy_then_device_then_keywords():
    for cls in BACKENDS.values():
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert [p.name for p in params[:2]] == ["policy", "device"]
        assert params[1].default is None
        assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])


@pytest.mark.parametrize("side", BACKENDS)
def test_policy_is_read_only(side):
    prec = BACKENDS[side]("bf16-mixed")
    with pytest.raises(AttributeError):
        prec.policy = "16-mixed"
    assert str(prec.policy) == "bf16-mixed" and prec.caps.platform == "cpu"


@pytest.mark.parametrize("side", BACKENDS)
def test_one_unsupported_error_and_unknown_devices_raise(side):
    import dualprec_jax
    import dualprec_torch

    assert dualprec_torch.UnsupportedPolicyError is dualprec_jax.UnsupportedPolicyError is UnsupportedPolicyError
    with pytest.raises(ValueError, match="device"):
        BACKENDS[side]("32-true", device="no-such-device")


def test_an_unknown_jax_platform_is_refused_not_taken_for_cpu():
    import dualprec_jax

    class Metal:
        platform = "METAL"

    with pytest.raises(ValueError, match="METAL"):
        dualprec_jax.device_caps(Metal())


def test_one_quantization_error_class():
    """Both quant modules raise the spec's class: ``except QuantizationError`` catches either."""
    from dualprec.errors import QuantizationError
    from dualprec_jax import quant as jq
    from dualprec_torch import quant as tq

    assert tq.QuantizationError is jq.QuantizationError is QuantizationError


def test_one_loss_scale_state_name_with_the_same_fields_everywhere():
    """`LossScaleState` is the state in the reference and in both backends (scale, counter);
    the configuration is the Policy's `LossScaleConfig`; nothing else is called a state."""
    import dataclasses

    from dualprec import LossScaleConfig, Policy
    from dualprec.ref import loss_scale as ref

    policy = Policy.parse("16-mixed")
    assert isinstance(policy.loss_scale, LossScaleConfig)
    ref_fields = tuple(f.name for f in dataclasses.fields(ref.LossScaleState))
    assert ref_fields == dualprec_torch.LossScaleState._fields == dualprec_jax.LossScaleState._fields
    assert ref_fields == ("scale", "counter")
    t = dualprec_torch.Precision(policy).loss_scale
    j = dualprec_jax.loss_scale_init(policy.loss_scale)
    r = ref.loss_scale_init(policy.loss_scale)
    assert isinstance(t, dualprec_torch.LossScaleState) and isinstance(j, dualprec_jax.LossScaleState)
    assert float(t.scale) == float(j.scale) == float(r.scale) == 2.0**16
    assert int(t.counter) == int(j.counter) == r.counter == 0
