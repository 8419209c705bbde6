"""`dualprec diagnose`: JSON, the report directory, the 80-column table, errors."""

import json

import pytest

from dualprec.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    """torch at one thread for this module (tests/conftest.py)."""


@pytest.mark.slow
def test_json_report_and_plots(tmp_path, capsys):
    rc = main(["diagnose", "--model", "mlp", "--policy", "bf16-mixed", "--steps", "1", "--no-gains", "--quiet",
               "--target", "0.05", "--json", "--report", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    rep = out["reports"][0]
    assert rc == 0 and rep["backend"] == "torch" and rep["meets_target"]
    assert sorted(rep["ranking"]) == ["fc1", "fc2", "head"]
    for name in ("report.md", "report.json", "errors.png", "ranges_torch.png", "before_after.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| module |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_table_fits_80_columns(capsys):
    rc = main(["diagnose", "--model", "fragile", "--policy", "16-mixed", "--steps", "1", "--no-gains", "--quiet",
               "--target", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "@norm=(compute=float32)" in out.replace("\n", "") and "@scores=(compute=float32)" in out.replace("\n", "")


def test_user_model_factory(capsys):
    rc = main(["diagnose", "--model", "bench.bench_diagnose:nope", "--policy", "16-mixed", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot import nope" in err and len(err.strip().splitlines()) == 1


def test_bad_policy_and_model(capsys):
    assert main(["diagnose", "--model", "mlp", "--policy", "bf17-mixed"]) == 2
    assert "bf17" in capsys.readouterr().err
    assert main(["diagnose", "--model", "nosuch", "--policy", "16-mixed", "--quiet"]) == 1
    assert "unknown model 'nosuch'" in capsys.readouterr().err
