"""bench_quant_speed's bookkeeping (nothing here is timed): the markdown table the docs'
figures come from, the CPU identity recorded with results, and the thread pinning's refusal."""

import json
import os

import pytest

from bench import bench_quant_speed as bqs


def _stats(median, lo, hi, n=5):
    return {"median": median, "min": lo, "max": hi, "q1": median, "q3": median, "n": n, "iqr": 0.0}


def _row(impl, median, lo, hi, tokens=1):
    return {"mode": "nf4", "compute": "float32", "tokens": tokens, "out": 8192, "in": 2048, "impl": impl,
            "step_time": _stats(median, lo, hi)}


def test_markdown_table_gives_medians_ranges_and_ratios_of_the_same_cell(tmp_path):
    rows = [_row("bnb-train", 0.100, 0.090, 0.120), _row("torch", 0.110, 0.100, 0.130), _row("jax", 0.050, 0.040, 0.060),
            _row("bnb-eval", 0.025, 0.020, 0.030), _row("bnb-qlora-step", 0.400, 0.390, 0.410),
            _row("torch-qlora-step", 0.200, 0.190, 0.210), _row("jax-qlora-step", 0.300, 0.290, 0.310),
            _row("bnb-train", 0.300, 0.250, 0.350, tokens=64), _row("jax", 0.150, 0.140, 0.160, tokens=64)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"environment": {"threads": 2}, "rows": rows}))
    lines = bqs.markdown_table([path]).splitlines()
    assert len(lines) == 2 + 3  # header, rule, forward and LoRA step at 1 token, forward at 64
    fwd = [c.strip() for c in lines[2].strip("|").split("|")]
    assert fwd == ["2", "nf4", "float32", "8192x2048", "1", "forward", "50.0 (40.0-60.0)", "110.0 (100.0-130.0)",
                   "100.0 (90.0-120.0)", "25.0 (20.0-30.0)", "5", "0.50", "2.00", "1.10"]
    step = [c.strip() for c in lines[3].strip("|").split("|")]
    assert step[5:] == ["LoRA step", "300.0 (290.0-310.0)", "200.0 (190.0-210.0)", "400.0 (390.0-410.0)", "-", "5",
                        "0.75", "-", "0.50"]
    t64 = [c.strip() for c in lines[4].strip("|").split("|")]
    assert t64[4] == "64" and t64[7] == "-" and t64[11] == "0.50" and t64[13] == "-"


def test_cpu_identity_names_the_model_and_the_isa_flags():
    ident = bqs.cpu_identity()
    assert set(ident["isa"]) == set(bqs.ISA_FLAGS)
    assert all(isinstance(v, bool) for v in ident["isa"].values())
    assert ident["affinity"] == sorted(os.sched_getaffinity(0))
    if os.path.exists("/proc/cpuinfo"):
        assert ident["cpu_model"]


def test_pinning_more_threads_than_cpus_is_refused_with_the_count():
    n = len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit, match=f"only {n} CPUs"):
        bqs.pin_threads(n + 1)
