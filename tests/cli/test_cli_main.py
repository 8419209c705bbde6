"""The `dualprec` entry point: --help, --version, one-line errors, --debug, bench from anywhere."""

import subprocess
import sys

import pytest

import dualprec
from dualprec import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dualprec {dualprec.__version__}"


def test_help_lists_every_subcommand_with_its_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name, (_, help_text) in cli.SUBCOMMANDS.items():
        assert name in out
        assert help_text in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_bad_policy_is_one_line_exit_2(capsys):
    assert cli.main(["explain", "bf16-mixd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bf16-mixed" in err and "Traceback" not in err


def test_unexpected_error_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(cli.run, "presets", boom)
    assert cli.main(["presets"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: disk on fire" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "presets"])


def test_bench_runs_outside_the_checkout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dualprec.cli", "bench", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "run" in proc.stdout and "not available" not in proc.stderr
