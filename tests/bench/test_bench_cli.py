"""The command line and the GPU script's plan, without timing anything long."""

import json

from bench.cli import main


def test_list_and_theory(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mlp-gpu" in out and "fp8-current" in out
    assert main(["theory"]) == 0
    assert "| bf16-true | 2 | 2 | 4 | 8 |" in capsys.readouterr().out


def test_unknown_policy_fails_before_timing(capsys):
    assert main(["run", "--policies", "bf16-mixd"]) == 2
    assert "bf16-mixd" in capsys.readouterr().err


def test_run_writes_json(tmp_path):
    rc = main(["run", "--workload", "mlp-smoke", "--policies", "bf16-true", "--backends", "torch",
               "--impls", "hand", "--warmup", "1", "--rounds", "1", "--steps", "1", "--name", "t",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("*-t.json")
    data = json.loads(path.read_text())
    (rec,) = data["records"]
    assert rec["policy"] == "bf16-true" and rec["status"] == "ok" and rec["step_time"]["median"] > 0
    assert data["environment"]["versions"]["torch"]


def test_dualprec_cli_dispatches_to_bench(capsys):
    from dualprec.cli import main as dualprec_main
    assert dualprec_main(["bench", "theory"]) == 0
    assert "| nf4 |" in capsys.readouterr().out


def test_gpu_plan_orders_rows_by_importance():
    from bench.gpu_run import Plan, build_plan

    rows = build_plan(Plan(smoke=True))
    names = [r.name for r in rows]
    assert names[0].startswith("a jax bf16-mixed")  # the re-measure after the custom-VJP fix
    assert names.index("b1 torch bf16-mixed eager hand vs Precision") < names.index("c1 torch fp8 current vs bf16-mixed, compiled")
    optional = [r for r in rows if r.optional]
    assert optional and all(r.optional for r in rows[rows.index(optional[0]):])
    assert any("compiled" in r.name for r in rows if not r.optional)
