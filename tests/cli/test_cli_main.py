"""The `dualprec` entry point: --help, --version, one-line errors, --debug, bench from a checkout only."""

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


def _installed_like(tmp_path):
    """A sys.path with dualprec (and conformance) but no bench/, as an installed wheel has."""
    from pathlib import Path

    root = Path(cli.__file__).resolve().parents[1]
    site = tmp_path / "site"
    site.mkdir()
    for package in ("dualprec", "conformance"):
        (site / package).symlink_to(root / package)
    return {**__import__("os").environ, "PYTHONPATH": str(site)}, root


def test_bench_outside_a_checkout_says_where_it_runs_without_touching_sys_path(tmp_path):
    env, _ = _installed_like(tmp_path)
    code = ("import sys; from dualprec import cli; before = list(sys.path); rc = cli.main(['bench', '--help']); "
            "assert sys.path == before, 'sys.path was edited'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == cli.BENCH_FROM_CHECKOUT + "\n"
    assert "python -m bench" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_runs_from_the_checkouts_root(tmp_path):
    env, root = _installed_like(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "dualprec.cli", "bench", "--help"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dualprec bench") and "run" in proc.stdout
