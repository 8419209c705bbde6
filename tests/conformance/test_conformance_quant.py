"""Quantized policies in the suite: both backends quantize the same canonical weights, the
quant-codes check compares their bitsandbytes state byte for byte, and it has teeth."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("bitsandbytes")

from conformance import matrix  # noqa: E402
from conformance.backends import jax_backend  # noqa: E402


def _run(policy: str, steps: int = 1):
    return matrix.run({policy: matrix.resolve_policy(policy)[1]}, models=["mlp"], steps=steps)


@pytest.mark.parametrize("policy", ["nf4-dq", "int8"])
def test_quantized_policies_run_and_agree(policy):
    recs = _run(policy)
    bad = [(r.check, r.status, r.reason) for r in recs if r.status != "pass"]
    assert not bad, bad
    q = next(r for r in recs if r.check == "quant-codes")
    assert q.detail["frozen"] == ["fc1.weight", "fc2.weight", "head.weight"]
    assert q.detail["tensors"] >= 6 and q.detail["dequantized"] == q.detail["frozen"]
    # the frozen codes are no parameters: gradients and trained parameters are the biases
    grads = next(r for r in recs if r.check == "gradients")
    assert set(grads.detail["per_tensor"]) == {"loss", "fc1.bias", "fc2.bias", "head.bias"}


def test_a_flipped_code_byte_fails_quant_codes(monkeypatch):
    real = jax_backend.JaxSession.quant_state

    def tampered(self):
        out = real(self)
        key = "fc2.weight.absmax"
        a = np.array(out[key])
        a.view(np.uint8)[0] ^= 1
        out[key] = a
        return out

    monkeypatch.setattr(jax_backend.JaxSession, "quant_state", tampered)
    recs = _run("nf4")
    q = next(r for r in recs if r.check == "quant-codes")
    assert q.status == "fail" and "fc2.weight.absmax" in q.reason


def test_a_gradient_on_frozen_codes_fails_quant_codes(monkeypatch):
    monkeypatch.setattr(jax_backend.JaxSession, "frozen_with_grad", lambda self: ["fc1"])
    q = next(r for r in _run("nf4") if r.check == "quant-codes")
    assert q.status == "fail" and "got a gradient" in q.reason
