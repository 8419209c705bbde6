"""`bench run` writes where it is run, never into the checkout it was installed from."""

import json
from pathlib import Path

from bench.cli import main
from bench.harness import DEFAULT_RESULTS_DIR, default_results_dir, results_path

CHECKOUT = Path(__file__).resolve().parents[2]


def test_run_outside_the_checkout_writes_into_the_current_directory(tmp_path, monkeypatch, capsys):
    before = set(DEFAULT_RESULTS_DIR.iterdir()) if DEFAULT_RESULTS_DIR.is_dir() else set()
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--workload", "mlp-smoke", "--policies", "bf16-true", "--backends", "torch",
               "--impls", "hand", "--warmup", "1", "--rounds", "1", "--steps", "1", "--name", "here"])
    assert rc == 0
    (path,) = (tmp_path / "bench-results").glob("*-here.json")
    assert json.loads(path.read_text())["records"][0]["policy"] == "bf16-true"
    assert f"wrote {path}" in capsys.readouterr().out.replace("\n", "")
    after = set(DEFAULT_RESULTS_DIR.iterdir()) if DEFAULT_RESULTS_DIR.is_dir() else set()
    assert after == before  # nothing new in the checkout's bench/results


def test_from_the_checkout_root_the_committed_results_folder_is_used(monkeypatch):
    monkeypatch.chdir(CHECKOUT)
    assert default_results_dir() == DEFAULT_RESULTS_DIR
    monkeypatch.chdir(CHECKOUT / "bench")  # anywhere else: ./bench-results
    assert default_results_dir() == CHECKOUT / "bench" / "bench-results"
    assert results_path("x", {"date": "d", "machine": "m"}).parent == CHECKOUT / "bench" / "bench-results"
