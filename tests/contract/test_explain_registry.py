"""`dualprec explain` says only what a backend registered it runs, and "not available in this
backend" for the rest; what it says agrees with what each Precision accepts."""

import pytest

import dualprec_jax
import dualprec_torch
from dualprec import DeviceCaps, Policy, explain, presets, registry
from dualprec.errors import UnsupportedPolicyError

PRECISION = {"torch": dualprec_torch.Precision, "jax": dualprec_jax.Precision}
# a device that runs everything, so only what the backend implements decides
EVERYTHING = {b: DeviceCaps("cuda", "H100", (9, 0), backend=b, bitsandbytes=True, transformer_engine=True)
              for b in PRECISION}


def _builds(backend: str, policy: Policy) -> bool:
    try:
        PRECISION[backend](policy, device=EVERYTHING[backend])
    except UnsupportedPolicyError:
        return False
    return True


@pytest.mark.parametrize("name", list(presets()))
def test_explain_matches_what_each_backend_runs(name):
    policy = presets()[name]
    described = explain(policy)["backends"]
    for backend in PRECISION:
        lines = described[backend]
        missing = [k for k, v in lines.items() if registry.NOT_AVAILABLE in v or registry.REFUSED in v]
        assert _builds(backend, policy) == (not missing), (backend, name, missing)


def test_an_unregistered_path_reads_not_available(monkeypatch):
    monkeypatch.delitem(registry._REGISTRY, ("jax", "quantization.nf4"))
    text = explain(Policy.parse("nf4"))["backends"]
    assert text["jax"]["quantization"].endswith(registry.NOT_AVAILABLE)
    assert "Linear4bit" in text["torch"]["quantization"]


def test_registering_takes_one_line_and_checks_the_feature(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("jax", "fp8.native", lambda p: f"history {p.fp8.history_len}")
    assert registry.describe("jax", "fp8.native", Policy.parse("bf16-mixed,fp8=delayed(history=16)")) == "history 16"
    with pytest.raises(ValueError, match="unknown feature"):
        registry.register("torch", "quantization.int4", "x")


def test_the_torch_nf4_line_is_the_layer_setup_builds():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    dualprec_torch.Precision("nf4").setup(model)
    assert isinstance(model[0], bnb.nn.Linear4bit)
    assert "Linear4bit" in explain(Policy.parse("nf4"))["backends"]["torch"]["quantization"]
