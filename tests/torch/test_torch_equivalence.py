"""N training steps through Precision are bit-identical to the same steps written by hand."""

import pytest
import torch
from torch_support import POLICIES, assert_same_state, run_by_hand, run_precision

from dualprec import Policy

STEPS = 6


@pytest.mark.parametrize("kind", ["mlp", "block"])
@pytest.mark.parametrize("policy", POLICIES)
def test_steps_match_hand_written_loop(policy, kind):
    log_p, log_h = [], []
    model_p, opt_p, _ = run_precision(policy, kind, STEPS, log=log_p)
    model_h, opt_h, _ = run_by_hand(policy, kind, STEPS, log=log_h)
    assert log_p == log_h
    assert_same_state(model_p, opt_p, model_h, opt_h)
    # the run trained: parameters moved away from their initial values
    start = run_precision(policy, kind, 0)[0]
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), model_p.parameters()))


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed", "mixed_bfloat16"])
def test_fp32_op_policy_is_what_makes_them_match(policy):
    """Without the explicit float32 norms/softmax the hand-written loop drifts: the
    equivalence above depends on Precision enforcing them on CPU."""
    import torch_support as ts

    original = ts.Block.forward

    def low_precision_forward(self, x, explicit_fp32=False):
        return original(self, x, explicit_fp32=False)

    ts.Block.forward = low_precision_forward
    try:
        model_h, _, _ = run_by_hand(policy, "block", 3)
    finally:
        ts.Block.forward = original
    model_p, _, _ = run_precision(policy, "block", 3)
    assert any(not torch.equal(a, b) for a, b in zip(model_p.parameters(), model_h.parameters()))


def test_policies_cover_every_preset_without_quantization_or_fp8():
    from dualprec import presets

    in_scope = {name for name, p in presets().items() if p.quantization is None and p.fp8 is None}
    assert in_scope <= {str(Policy.parse(p)) for p in POLICIES}
