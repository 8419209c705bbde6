"""The CLI's exit codes and outputs, the record schema, skip records, golden files and the plugin."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_conformance_localise import BrokenFc2MLP

import conformance.backends as backends_pkg
from conformance import cli, golden
from conformance.records import REQUIRED_KEYS, Record, validate


@pytest.fixture
def standins(monkeypatch, fp32_backends):
    monkeypatch.setattr(backends_pkg, "default_backends", lambda: fp32_backends)
    return fp32_backends


def test_cli_json_passes_and_follows_the_schema(standins, capsys):
    assert cli.main(["--policy", "32-true", "--model", "mlp", "--steps", "2", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    validate(data)
    assert all(list(d)[: len(REQUIRED_KEYS)] == list(REQUIRED_KEYS) for d in data)
    assert {d["status"] for d in data} == {"pass"}
    assert {d["tier"] for d in data} == {"bit-exact", "tolerance"}


def test_cli_exit_code_is_nonzero_on_failure_and_report_is_written(standins, monkeypatch, tmp_path, capsys):
    import dataclasses

    from conformance import zoo

    monkeypatch.setitem(zoo.ZOO, "mlp", dataclasses.replace(zoo.ZOO["mlp"], build_flax=BrokenFc2MLP))
    rc = cli.main(["--policy", "32-true", "--model", "mlp", "--steps", "2", "--report", str(tmp_path)])
    assert rc == 1
    assert "failed" in capsys.readouterr().out
    data = json.loads((tmp_path / "records.json").read_text())
    validate(data)
    fwd = next(d for d in data if d["check"] == "forward")
    assert fwd["status"] == "fail" and fwd["where"] == "fc2"
    md = (tmp_path / "report.md").read_text()
    assert "## Failures" in md and "fc2" in md
    assert list(tmp_path.glob("train_*.png"))


def test_cli_usage_errors(capsys):
    assert cli.main(["--policy", "bf17-mixed"]) == 2
    assert cli.main(["--model", "resnet"]) == 2
    assert "error" in capsys.readouterr().err


def test_unrunnable_policies_are_skips_with_reasons():
    from conformance import matrix
    from conformance.backends.jax_backend import JaxBackend
    from conformance.backends.torch_backend import TorchBackend
    from dualprec.errors import UnsupportedPolicyError

    def refuse(policy):
        raise UnsupportedPolicyError(f"{policy} needs a feature this build lacks")

    recs = matrix.run({"nf4": matrix.resolve_policy("nf4")[1], "bf16-mixed+fp8": matrix.combination("bf16-mixed+fp8")},
                      models=["mlp"], steps=1, backends=(TorchBackend(refuse), JaxBackend(refuse)))
    assert recs and all(r.status == "skip" and "lacks" in r.reason for r in recs)
    assert {"quant-codes", "fp8-scales"} <= {r.check for r in recs}


def test_schema_rejects_bad_records():
    with pytest.raises(ValueError):
        Record("p", "m", "c", "tolerance", "fail")  # a failure needs a reason
    with pytest.raises(ValueError, match="lacks"):
        validate([{"policy": "p"}])
    good = Record("p", "m", "c", "tolerance", "pass", max_rel_err=float("nan")).to_dict()
    json.dumps(good, allow_nan=False)  # NaN errors are stored as strings: strict JSON
    validate([good])


def test_golden_round_trip(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    arrays = {"out": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16), "idx": np.arange(5)}
    path = golden.save(tmp_path / "g.npz", arrays, "bf16-mixed", note="x")
    back, header = golden.load(path)
    assert back["out"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["out"].view(np.uint16),
                                                                      arrays["out"].view(np.uint16))
    assert header["policy"] == "bf16-mixed" and header["note"] == "x"
    assert all(r.status == "pass" for r in golden.check(path, arrays))
    off = dict(arrays, out=(arrays["out"].astype(np.float32) * 1.2).astype(ml_dtypes.bfloat16))
    bad = [r for r in golden.check(path, off) if r.status == "fail"]
    assert [r.where for r in bad] == ["out"] and "ULP of bfloat16" in bad[0].reason
    assert golden.check(path, arrays, policy="32-true")[0].status == "fail"  # recorded under another policy


@pytest.mark.slow
def test_pytest_plugin_makes_it_one_line(tmp_path):
    test = tmp_path / "test_user.py"
    test.write_text(textwrap.dedent('''
        import numpy as np
        pytest_plugins = ["conformance.pytest_plugin"]

        def test_model(golden):
            import os
            scale = float(os.environ.get("SCALE", "1"))
            golden("mine", {"logits": np.linspace(-1, 1, 16, dtype=np.float32) * scale}, policy="32-true")
    '''))

    def run(scale):
        import os

        env = dict(os.environ, SCALE=scale, PYTHONPATH=":".join(sys.path))
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                              cwd=tmp_path, env=env, capture_output=True, text=True)

    assert run("1").returncode == 0 and (tmp_path / "golden" / "mine.npz").exists()
    assert run("1").returncode == 0
    failed = run("1.01")
    assert failed.returncode == 1 and "logits" in failed.stdout
