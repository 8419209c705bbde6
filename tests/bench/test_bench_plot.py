"""Report generation from a small synthetic results file: the Markdown tables, the PNG and
the date/machine/versions stamp."""

import pytest

from bench.harness import Record, ResultsFile
from bench.plot import memory_markdown, speed_markdown, stamp, write_report


def _mem(policy, backend, w, g, o):
    return Record(workload="w", backend=backend, policy=policy, mode="memory",
                  extra={"memory": {"bytes_per_param": {"weights": w, "grads": g, "optimizer": o,
                                                        "total": w + g + o}},
                         "theory_bytes_per_param": {"total": 16}})


@pytest.fixture
def results(tmp_path):
    env = {"date": "2026-11-28", "machine": "h200", "versions": {"dualprec": "0.1.0", "torch": "2.11", "jax": "0.11.2"}}
    rf = ResultsFile(tmp_path / "2026-11-28-h200-gpu.json", name="gpu", env=env)
    for backend, hand_s, dp_s in (("torch", 0.1, 0.101), ("jax", 0.09, 0.09)):
        rf.add(Record(workload="w", backend=backend, policy="bf16-mixed", impl="hand", mode="eager",
                      step_time={"median": hand_s, "iqr": 0.0}, tflops=1.0 / hand_s))
        rf.add(Record(workload="w", backend=backend, policy="bf16-mixed", impl="dualprec", mode="eager",
                      step_time={"median": dp_s, "iqr": 0.0}, tflops=1.0 / dp_s))
    rf.add(Record(workload="w", backend="torch", policy="nf4", impl="hand", step_time={"median": 0.2, "iqr": 0},
                  tflops=5.0))
    rf.add(Record(workload="w", backend="torch", policy="nf4", impl="dualprec", status="not implemented",
                  reason="quantization issue"))
    rf.add(Record(workload="g", backend="torch", policy="bf16", impl="ceiling", step_time={"median": 1, "iqr": 0},
                  tflops=790.0))
    rf.add(_mem("bf16-mixed", "torch", 4, 4, 8))
    rf.add(_mem("bf16-mixed", "jax", 4, 4, 8))
    return rf.path


def test_speed_markdown_pairs_hand_and_dualprec(results):
    records = ResultsFile.load(results)["records"]
    md = speed_markdown(records)
    assert "| bf16-mixed | torch | eager | 10.00 | 9.90 | 1.010 |  |" in md
    assert "| nf4 | torch | eager | 5.00 | - | - | dualprec: not implemented (quantization issue) |" in md


def test_memory_markdown(results):
    md = memory_markdown(ResultsFile.load(results)["records"])
    assert "| bf16-mixed | jax | 4.000 | 4.000 | 8.000 | 16.000 | 16 |" in md


def test_write_report_makes_png_and_markdown(results, tmp_path):
    png, md = write_report([results], out_dir=tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = md.read_text()
    assert text.startswith("Measured 2026-11-28 on h200 (dualprec 0.1.0, torch 2.11, jax 0.11.2).")
    assert "| bf16 (g) | torch | 790.0 |" in text and png.name in text


def test_stamp_joins_runs():
    envs = [{"date": "2026-01-01", "machine": "a", "versions": {"torch": "1"}},
            {"date": "2026-01-02", "machine": "b", "versions": {}}]
    assert stamp(envs) == "2026-01-01 / 2026-01-02 on a, b (torch 1)"
