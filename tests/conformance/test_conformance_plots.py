"""The report's plots say pass or fail and show the tolerance: a heat-map cell with one failed
check is red (it used to be a lighter green), the per-layer plot draws each criterion's bound
(ULP and share of elements not bitwise equal) and puts bitwise-equal layers at 0 (not on an
unexplained 1e-2 floor), and the training plot names the outcome of each model's checks."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgba  # noqa: E402

from conformance.records import Record  # noqa: E402
from conformance.report import (  # noqa: E402
    FAIL_COLOUR,
    PASS_COLOUR,
    SKIP_COLOUR,
    heatmap_cells,
    heatmap_figure,
    layers_figure,
    training_figure,
    write_report,
)

WHY = "first divergence at fc2: 72.3% of elements not bitwise equal > bound 2.0%"


def _matrix():
    recs = [Record("bf16-mixed", "mlp", "forward", "tolerance", "pass") for _ in range(11)]
    recs.append(Record("bf16-mixed", "mlp", "layers", "tolerance", "fail", reason=WHY))
    recs += [Record("bf16-mixed", "cnn", "forward", "tolerance", "pass") for _ in range(12)]
    recs += [Record("32-true", "mlp", "forward", "tolerance", "pass"),
             Record("32-true", "mlp", "gradients", "tolerance", "error", reason="raised RuntimeError: x")]
    recs.append(Record("32-true", "cnn", "forward", "tolerance", "skip", reason="not here"))
    return recs


def test_a_cell_with_any_failure_is_a_failing_cell():
    cells = heatmap_cells(_matrix())
    assert cells[("bf16-mixed", "mlp")] == ("fail", "11 ok\n1 FAIL")  # 11 of 12 passed: still a failure
    assert cells[("bf16-mixed", "cnn")] == ("pass", "12 ok")
    assert cells[("32-true", "mlp")] == ("fail", "1 ok\n1 FAIL")  # an error counts as a failure
    assert cells[("32-true", "cnn")] == ("skip", "skip")


def test_heatmap_draws_failing_cells_red_and_passing_green():
    fig = heatmap_figure(_matrix())
    image = fig.axes[0].images[0]
    colour = lambda i, j: image.cmap(image.norm(image.get_array()[i, j]))  # noqa: E731
    assert colour(0, 0) == to_rgba(FAIL_COLOUR)   # bf16-mixed / mlp: 11 passed, 1 failed
    assert colour(0, 1) == to_rgba(PASS_COLOUR)
    assert colour(1, 0) == to_rgba(FAIL_COLOUR)
    assert colour(1, 1) == to_rgba(SKIP_COLOUR)
    assert "red: at least one failed" in fig.axes[0].get_title()


def _entry(ulp, neq):
    return {"max_ulp": ulp, "neq_frac": neq, "max_rel": 1e-3 * ulp, "size": 8, "dtype": "bfloat16",
            "bound": {"max_ulp": 1.0, "max_neq": 0.02}}


def _layer_records():
    # 16-mixed's fc2: within the ULP bound, past the share bound (the criterion that failed
    # must be visible); fc1 bitwise equal under both
    per_pass = {"fc1": _entry(0.0, 0.0), "fc2": _entry(1.0, 0.01)}
    per_fail = {"fc1": _entry(0.0, 0.0), "fc2": _entry(1.0, 0.723)}
    return [Record("bf16-mixed", "mlp", "layers", "tolerance", "pass", detail={"per_tensor": per_pass}),
            Record("16-mixed", "mlp", "layers", "tolerance", "fail", reason=WHY, detail={"per_tensor": per_fail})]


def _line(ax, predicate):
    return [ln for ln in ax.get_lines() if predicate(ln)]


def test_layer_plot_shows_both_bounds_exact_zeros_and_failures():
    fig = layers_figure("mlp", _layer_records())
    ax_ulp, ax_neq = fig.axes
    assert ax_ulp.get_yscale() == ax_neq.get_yscale() == "symlog"
    measured = _line(ax_ulp, lambda ln: ln.get_linestyle() == "-" and ln.get_marker() == "o")
    assert [list(ln.get_ydata()) for ln in measured] == [[0.0, 1.0], [0.0, 1.0]]  # exact: at 0, no floor
    assert [ln.get_label() for ln in measured] == ["bf16-mixed (pass)", "16-mixed (fail)"]
    bounds = _line(ax_neq, lambda ln: ln.get_linestyle() == "--")
    assert [list(ln.get_ydata()) for ln in bounds] == [[2.0, 2.0], [2.0, 2.0]]  # the share bound, in %
    assert _line(ax_ulp, lambda ln: ln.get_linestyle() == "--")  # and the ULP bound
    crosses = _line(ax_neq, lambda ln: ln.get_marker() == "x" and len(ln.get_xdata()))
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [1]  # 16-mixed's fc2, past the share bound
    assert np.isclose(crosses[0].get_ydata()[0], 72.3)
    assert to_rgba(crosses[0].get_color()) == to_rgba(FAIL_COLOUR)


def _train(status, step=None):
    series = {"loss_a": [1.0, 0.9, 0.8], "loss_b": [1.0, 0.9, 0.85], "loss_rel": [0.0, 1e-4, 0.06],
              "param_rel": [0.0, 1e-4, 1e-3], "tol": [1e-3, 1e-3, 1e-3]}
    return Record("16-mixed", "mlp", "train-loss", "tolerance", status, reason=WHY if status == "fail" else "",
                  step=step, detail={"series": series})


def test_training_plot_names_the_outcome_and_marks_the_failing_step():
    params = {"mlp": Record("16-mixed", "mlp", "train-params", "tolerance", "pass")}
    fig = training_figure("16-mixed", [_train("fail", step=2)], params)
    ax = fig.axes[1]
    assert "mlp FAIL" in ax.get_title()
    crosses = _line(ax, lambda ln: ln.get_marker() == "x")
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [2]
    fig = training_figure("16-mixed", [_train("pass")], params)
    assert "mlp pass" in fig.axes[1].get_title()
    failed_params = {"mlp": Record("16-mixed", "mlp", "train-params", "tolerance", "fail", reason=WHY)}
    assert "mlp FAIL" in training_figure("16-mixed", [_train("pass")], failed_params).axes[1].get_title()


def test_write_report_writes_every_plot(tmp_path):
    path = write_report(_matrix() + _layer_records() + [_train("fail", step=2)], tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"heatmap.png", "layers_mlp.png", "train_16-mixed.png", "report.md", "records.json"} <= names
    assert "![matrix](heatmap.png)" in path.read_text()
