"""The examples run as written (smoke tests: the scripts themselves, in a subprocess, on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


def _run(*args, cwd=None):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_both_frameworks_learn_the_same_curve(tmp_path):
    out = tmp_path / "losses.png"
    stdout = _run(EXAMPLES / "compare_frameworks.py", "--steps", "60", "--out", out)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gap = float(stdout.strip().rsplit(" ", 1)[-1])
    assert gap < 0.05, stdout  # same weights, data and policy: the curves overlay


def test_a_policy_file_change_reaches_both_scripts(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[tool.dualprec]\npolicy = "16-mixed"\n')
    for script in ("train_torch.py", "train_flax.py"):
        losses = tmp_path / f"{script}.json"
        _run(EXAMPLES / script, "--policy-file", policy, "--steps", "20", "--quiet", "--losses", losses)
        record = json.loads(losses.read_text())
        assert record["policy"] == "16-mixed" and len(record["losses"]) == 20
        assert record["losses"][-1] < record["losses"][0]
