"""Workload sizes, the policy rows, the theoretical memory table, and one real (untimed) pass
of the smallest workload per backend so the builders and memory measurement are exercised."""

import pytest

from bench.memory import THEORY, measure_jax, measure_torch, storage_bytes, theoretical
from bench.workloads import (
    POLICIES,
    WORKLOADS,
    MLPConfig,
    dualprec_status,
    policy_records,
    policy_row,
)


def test_gpu_workload_is_the_reference_537m_mlp():
    cfg = WORKLOADS["mlp-gpu"]
    assert cfg.params == 536_985_600  # the 537M-parameter H200 reference workload
    assert cfg.train_flops() == 6 * cfg.params * 16384


def test_frozen_flops_count_no_weight_gradients():
    cfg = MLPConfig("t", 8, 16, 2, 4)
    assert cfg.linear_params == 2 * 2 * 8 * 16
    assert cfg.frozen_train_flops() == 4 * cfg.linear_params * 4


def test_policy_rows_parse_and_name_what_is_missing():
    assert [r.label for r in POLICIES] == ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "fp8-current", "nf4"]
    assert policy_row("fp8-current").canonical().endswith("fp8=current")
    assert "not implemented" in dualprec_status("torch", "nf4")
    assert dualprec_status("jax", "fp8-current") is None  # both native FP8 engines exist
    with pytest.raises(KeyError):
        policy_row("bf16-mixd")


def test_theory_table():
    assert theoretical("bf16-mixed") == {"weights": 4, "grads": 4, "optimizer": 8, "total": 16}
    assert theoretical("bf16-true")["total"] == 8
    assert theoretical("nf4")["weights"] == 0.5625
    assert set(THEORY) == {r.label for r in POLICIES}


def test_storage_bytes_counts_shared_storage_once():
    torch = pytest.importorskip("torch")
    a = torch.zeros(10, dtype=torch.float32)
    assert storage_bytes([a, a[2:5], torch.zeros(3, dtype=torch.bfloat16), None]) == 40 + 6


TINY = MLPConfig("tiny", 16, 32, 1, 16)


def test_torch_memory_matches_dtypes():
    m = measure_torch(TINY, "bf16-true")
    assert m["bytes_per_param"]["weights"] == 2.0 and m["bytes_per_param"]["grads"] == 2.0
    # + one fp32 AdamW step counter per tensor: 6 x 4 bytes over 1104 params
    assert m["bytes_per_param"]["optimizer"] == pytest.approx(4.0 + 24 / 1104)
    assert measure_torch(TINY, "32-true")["bytes_per_param"]["total"] == pytest.approx(16.0, abs=0.05)


def test_jax_memory_matches_dtypes():
    pytest.importorskip("flax")
    m = measure_jax(TINY, "bf16-mixed")
    assert m["bytes_per_param"]["weights"] == 4.0 and m["bytes_per_param"]["grads"] == 4.0
    assert m["bytes_per_param"]["optimizer"] == pytest.approx(8.0, abs=0.02)
    assert m["live_arrays_delta_after_step"] > 0


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_policy_records_pair_and_placeholder(backend):
    recs = policy_records(TINY, backend, "nf4", warmup=1, rounds=1, steps_per_round=1)
    assert [(r.impl, r.status) for r in recs] == [("hand", "ok"), ("dualprec", "not implemented")]
    assert recs[0].flops_per_step == TINY.frozen_train_flops()
    assert recs[0].tflops is None  # a tiny workload reports its time only (TINY_FLOPS)
    recs = policy_records(TINY, backend, "bf16-mixed", warmup=1, rounds=1, steps_per_round=1)
    assert [r.impl for r in recs] == ["hand", "dualprec"]
    assert all(r.ok for r in recs), [(r.impl, r.status) for r in recs]
    assert recs[0].baseline_ratio is None  # ratios are filled by the results file
    assert recs[1].policy_spec == "bf16-mixed"
