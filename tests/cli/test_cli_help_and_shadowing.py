"""`dualprec conformance --help` lists every model (opbyop was missing) at 80 columns, and a
user's own folder named like one of dualprec's top-level packages is named, not run."""

import sys

import pytest

from dualprec import cli

WIDTH = 80


def test_conformance_help_lists_every_model_at_80_columns(capsys, monkeypatch):
    from conformance.zoo import MODELS

    monkeypatch.setenv("COLUMNS", str(WIDTH))
    with pytest.raises(SystemExit) as e:
        cli.main(["conformance", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dualprec conformance")
    options = out.split("\n  --model MODEL", 1)[1]  # the option's entry, not the usage line
    model_help = " ".join(options.split("\n  --steps", 1)[0].split())
    for name in MODELS:
        assert name in model_help, name
    assert all(len(line) <= WIDTH for line in out.splitlines())


def test_a_folder_named_conformance_in_the_cwd_is_named_not_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "conformance").mkdir()
    (tmp_path / "conformance" / "__init__.py").write_text("raise SystemExit('the user code ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m dualprec.cli` puts the cwd first
    for name in [m for m in sys.modules if m == "conformance" or m.startswith("conformance.")]:
        monkeypatch.delitem(sys.modules, name)
    assert cli.main(["conformance", "--policy", "32-true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"is {tmp_path / 'conformance'}, not dualprec's" in err and "shadows it" in err


def test_dualprecs_own_packages_are_not_reported():
    assert cli._shadowed("conformance") is None and cli._shadowed("bench") is None


def test_the_all_extra_installs_lightning():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    included = extras["all"][0].split("[", 1)[1].rstrip("]").split(",")
    wanted = [dep for name in included for dep in extras[name]]
    assert any(dep.startswith("lightning") for dep in wanted), wanted
