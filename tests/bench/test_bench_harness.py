"""The harness arithmetic and bookkeeping: statistics, interleaved timing with a fake clock,
record schema, JSON files, baseline ratios and the budget guard.  Nothing here is timed."""

import json

import pytest

from bench.harness import (
    STATUS_NOT_IMPLEMENTED,
    STATUS_SKIPPED_BUDGET,
    BudgetGuard,
    Record,
    ResultsFile,
    Row,
    add_baseline_ratios,
    environment,
    reasons,
    results_path,
    rich_table,
    run_rows,
    summarize,
    tflops,
    time_interleaved,
)


class FakeClock:
    """A clock that advances only when a fake step says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def step(self, seconds):
        def run():
            self.now += seconds
            return seconds
        return run


def test_summarize_median_quartiles_and_extremes():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s.iqr == 2.0
    assert s.rel_iqr == pytest.approx(2.0 / 3.0)


def test_summarize_interpolates_even_counts():
    s = summarize([1.0, 2.0, 3.0, 10.0])
    assert s.median == 2.5
    assert s.q1 == pytest.approx(1.75)
    assert s.q3 == pytest.approx(4.75)


def test_summarize_rejects_no_samples():
    with pytest.raises(ValueError):
        summarize([])


def test_tflops():
    assert tflops(2e12, 0.5) == 4.0
    assert tflops(None, 0.5) is None
    assert tflops(1e12, 0.0) is None


def test_time_interleaved_alternates_and_separates_first_call():
    clock = FakeClock()
    calls = []
    durations = {"a": iter([9.0] + [1.0] * 20), "b": iter([7.0] + [2.0] * 20)}

    def make(name):
        def run():
            calls.append(name)
            clock.now += next(durations[name])
        return run

    t = time_interleaved({"a": make("a"), "b": make("b")}, warmup=2, rounds=2, steps_per_round=2, clock=clock)
    assert t["a"].first_call_s == 9.0 and t["b"].first_call_s == 7.0
    assert t["a"].samples == [1.0] * 4 and t["b"].samples == [2.0] * 4
    # first calls and warm-up, then rounds taking turns: a a b b a a b b
    assert calls == ["a", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b"]


def test_time_interleaved_syncs_every_timed_step():
    clock = FakeClock()
    synced = []
    time_interleaved({"x": clock.step(1.0)}, warmup=1, rounds=3, steps_per_round=2, clock=clock,
                     sync=synced.append)
    assert len(synced) == 1 + 6


def test_measured_record_fields():
    clock = FakeClock()
    t = time_interleaved({"s": clock.step(0.5)}, warmup=1, rounds=1, steps_per_round=3, clock=clock)["s"]
    r = Record.measured(timing=t, flops_per_step=1e12, workload="w", backend="torch", policy="bf16-mixed")
    assert r.ok and r.step_time["median"] == 0.5 and r.step_time["iqr"] == 0.0 and r.step_time["n"] == 3
    assert r.tflops == 2.0 and r.compile_s == 0.5
    assert r.key == "w/torch/bf16-mixed/eager/hand"


def test_tiny_workloads_report_time_and_noisy_ratios_are_labelled():
    from bench.harness import NOISY_REL_IQR, TINY_FLOPS, add_baseline_ratios

    clock = FakeClock()
    t = time_interleaved({"s": clock.step(0.5)}, warmup=1, rounds=1, steps_per_round=3, clock=clock)["s"]
    tiny = Record.measured(timing=t, flops_per_step=TINY_FLOPS / 10, workload="w", backend="torch", policy="p")
    assert tiny.tflops is None and tiny.step_time["median"] == 0.5
    hand = Record(workload="w", backend="torch", policy="p", step_time={"median": 1.0, "iqr": 0.01})
    steady = Record(workload="w", backend="torch", policy="p", impl="dualprec",
                    step_time={"median": 1.1, "iqr": 0.02})
    shaky = Record(workload="w", backend="torch", policy="p", impl="dualprec", mode="eager",
                   step_time={"median": 3.7, "iqr": 3.7 * (NOISY_REL_IQR + 0.05)})
    add_baseline_ratios([hand, steady, shaky])
    assert not steady.extra.get("ratio_noisy") and shaky.extra["ratio_noisy"] and shaky.noisy
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(rich_table([hand, steady, shaky, tiny]))
    text = console.export_text()
    assert "3.700 noisy" in text and "1.100 noisy" not in text and "tiny" in text


def test_not_run_records_hold_no_numbers():
    r = Record.not_run(STATUS_NOT_IMPLEMENTED, "later issue", workload="w", backend="jax", policy="nf4",
                       impl="dualprec")
    assert not r.ok and r.reason == "later issue" and r.tflops is None and r.step_time is None
    with pytest.raises(ValueError):
        Record.not_run("ok", workload="w", backend="jax", policy="nf4")


def _rec(impl, median, policy="bf16-mixed", backend="torch", mode="eager"):
    return Record(workload="w", backend=backend, policy=policy, impl=impl, mode=mode,
                  step_time={"median": median, "iqr": 0.0})


def test_baseline_ratio_is_step_time_over_hand_written_in_same_group():
    recs = [_rec("hand", 2.0), _rec("dualprec", 2.02), _rec("dualprec", 1.0, mode="compiled"),
            _rec("hand", 4.0, backend="jax"), _rec("dualprec", 3.0, backend="jax")]
    add_baseline_ratios(recs)
    assert recs[0].baseline_ratio == 1.0
    assert recs[1].baseline_ratio == pytest.approx(1.01)
    assert recs[1].baseline == "w/torch/bf16-mixed/eager/hand"
    assert recs[2].baseline_ratio is None  # no compiled hand-written twin
    assert recs[4].baseline_ratio == pytest.approx(0.75)


def test_results_file_flushes_each_record_and_round_trips(tmp_path):
    env = {"date": "2026-01-02", "machine": "box", "versions": {"torch": "x"}}
    path = results_path("my run", env, tmp_path)
    assert path.name == "2026-01-02-box-my-run.json"
    rf = ResultsFile(path, name="my run", env=env)
    rf.add(_rec("hand", 2.0))
    assert len(json.loads(path.read_text())["records"]) == 1  # on disk before the next row
    rf.add(_rec("dualprec", 3.0))
    data = ResultsFile.load(path)
    assert [r.impl for r in data["records"]] == ["hand", "dualprec"]
    assert data["records"][1].baseline_ratio == pytest.approx(1.5)
    assert data["records"][1].machine == "box" and data["records"][1].versions == {"torch": "x"}
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_unknown_schema(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": 99, "records": []}))
    with pytest.raises(ValueError, match="schema"):
        ResultsFile.load(p)


def test_record_from_dict_rejects_unknown_fields():
    d = _rec("hand", 1.0).to_dict()
    d["speed"] = 3
    with pytest.raises(ValueError, match="speed"):
        Record.from_dict(d)


def test_environment_names_date_machine_versions():
    env = environment()
    assert len(env["date"]) == 10 and env["machine"] and "torch" in env["versions"]


def test_budget_guard_with_reserve():
    clock = FakeClock()
    g = BudgetGuard(10.0, clock=clock)
    assert g.allows(10.0) and not g.allows(10.1)
    clock.now = 6.0
    assert g.remaining() == 4.0
    assert g.allows(3.0) and not g.allows(3.0, reserve_s=2.0)


def test_run_rows_skips_rows_past_budget_and_keeps_order(tmp_path):
    clock = FakeClock()
    guard = BudgetGuard(10.0, clock=clock)
    rf = ResultsFile(tmp_path / "r.json", name="r", env={"date": "d", "machine": "m"})

    def row(name, seconds, estimate, optional=False):
        def run():
            clock.now += seconds
            return [Record(workload=name, backend="torch", policy="p", step_time={"median": seconds, "iqr": 0})]
        return Row(name, run, estimate, optional=optional,
                   placeholders=lambda: [Record(workload=name, backend="torch", policy="p")])

    rows = [row("a", 4, 4), row("opt", 1, 3, optional=True), row("b", 4, 4), row("c", 5, 5)]
    out = run_rows(rows, guard, rf, log=lambda m: None)
    assert [r.workload for r in out] == ["a", "opt", "b", "c"]
    # "opt" fits alone (3 <= 6) but not with b and c still to come (3 + 9 > 6)
    assert [r.status for r in out] == ["ok", STATUS_SKIPPED_BUDGET, "ok", STATUS_SKIPPED_BUDGET]
    assert out[3].reason.startswith("needed ~5s") and out[3].step_time is None
    assert [r["status"] for r in json.loads(rf.path.read_text())["records"]] == [r.status for r in out]


def test_run_rows_records_errors_and_goes_on(tmp_path):
    guard = BudgetGuard(100.0)
    rf = ResultsFile(tmp_path / "r.json", name="r", env={"date": "d", "machine": "m"})

    def boom():
        raise RuntimeError("CUDA out of memory")
    rows = [Row("bad", boom, 1), Row("good", lambda: [_rec("hand", 1.0)], 1)]
    out = run_rows(rows, guard, rf, log=lambda m: None)
    assert out[0].status == "error" and "CUDA out of memory" in out[0].reason
    assert out[1].ok
    assert reasons(out) == ["error: RuntimeError: CUDA out of memory"]


def test_rich_table_has_a_row_per_record():
    from rich.console import Console
    table = rich_table([_rec("hand", 0.002), Record(workload="w", backend="jax", policy="nf4", impl="dualprec",
                                                    status=STATUS_NOT_IMPLEMENTED, reason="later")])
    assert table.row_count == 2
    console = Console(width=200, record=True)
    console.print(table)
    assert "not implemented" in console.export_text()
