"""The GPU benchmark section runs end to end on CPU with tiny sizes (its smoke test)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_torch  # noqa: E402


@pytest.mark.slow
def test_gpu_section_smoke_on_cpu():
    out = gpu_torch.run_gpu_torch(d=16, hidden=32, blocks=2, tokens=8, steps=1, warmup=1, rounds=1,
                                  compile_modes=(False,), device="cpu")
    assert out["params"] == 2 * (2 * 16 + 16 * 32 + 32 + 32 * 16 + 16)
    for policy in ("bf16-mixed", "16-mixed"):
        r = out[policy]["eager"]
        assert r["hand_tflops"] > 0 and r["precision_tflops"] > 0
        assert r["ratio"] > 0 and r["clock"] == "process_time"


def test_precision_step_equals_hand_step():
    """The two loops the benchmark times do the same arithmetic."""
    import torch

    from dualprec_torch import Precision

    x = torch.randn(8, 16)
    for policy, dtype in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):
        model_h, opt_h = gpu_torch._build(16, 32, 2, "cpu")
        prec = Precision(policy, device="cpu")
        model_p, opt_p = prec.setup(*gpu_torch._build(16, 32, 2, "cpu"))
        scaler = torch.amp.GradScaler("cpu") if policy == "16-mixed" else None
        for _ in range(3):
            gpu_torch.hand_step(model_h, opt_h, scaler, x, dtype, "cpu")
            gpu_torch.precision_step(prec, model_p, opt_p, x)
        for a, b in zip(model_h.parameters(), model_p.parameters()):
            assert torch.equal(a, b)


def test_measure_pair_returns_the_two_median_step_times():
    """bench/gpu_run.py unpacks measure_pair as (hand_s, precision_s)."""
    hand_s, prec_s = gpu_torch.measure_pair("bf16-mixed", d=8, hidden=16, blocks=1, tokens=4, steps=1,
                                            warmup=1, rounds=1, device="cpu")
    assert hand_s > 0 and prec_s > 0
