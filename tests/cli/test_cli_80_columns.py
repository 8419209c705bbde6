"""Every dualprec command (but conformance, which has its own test) rendered at 80 columns:
no cell cut with an ellipsis, every policy and preset name whole, lines within 80 columns
unless a single word is longer."""

import re

import pytest

from dualprec import cli
from dualprec.presets import PRESET_TABLE

WIDTH = 80
NAMES = [n for r in PRESET_TABLE for n in (r.name, *r.aliases)]


@pytest.fixture(autouse=True)
def _eighty_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setenv("LINES", "24")


def _check(text: str) -> None:
    assert "…" not in text  # rich's mark of a cut cell
    for line in text.splitlines():
        if len(line) > WIDTH:
            assert len(line.split()) == 1, f"{len(line)} columns: {line!r}"


def _run(capsys, *argv) -> str:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # --help
        code = e.code
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_presets_lists_every_name_whole(capsys):
    out = _run(capsys, "presets")
    _check(out)
    words = set(re.split(r"[\s,()]+", out))
    for name in NAMES:
        assert name in words, name


@pytest.mark.parametrize("name", [r.name for r in PRESET_TABLE])
def test_explain_every_preset_is_compact_and_whole(capsys, name):
    out = _run(capsys, "explain", name)
    _check(out)
    assert out.splitlines()[0].strip() == name
    assert len(out.splitlines()) <= 90  # the aten op list only with --ops
    assert "aten" not in out.replace("lists the aten ops", "")


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed,@lm_head=32-true,quant=nf4-dq(skip=lm_head)",
                                    "bf16-true,master=true,fp8=delayed"])
def test_explain_ops_prints_the_full_table_within_80_columns(capsys, policy):
    out = _run(capsys, "explain", policy, "--ops")
    _check(out)
    if "mixed" in policy:
        assert "aten mm" in out and "scaled_dot_product_attention" in out


def test_a_long_policy_wraps_after_its_commas(capsys):
    policy = "16-mixed,quant=nf4-dq(skip=lm_head,blocksize=64),@lm_head=32-true,@embed=(compute=float32)"
    out = _run(capsys, "explain", policy)
    _check(out)
    head = []
    for line in out.splitlines():
        head.append(line.strip())
        if not line.rstrip().endswith(","):
            break
    from dualprec import Policy
    assert Policy.parse("".join(head)) == Policy.parse(policy)  # the wrapped string copies back whole


@pytest.mark.parametrize("argv", [["--help"], ["explain", "--help"], ["presets", "--help"], ["bench", "--help"],
                                  ["bench", "run", "--help"], ["bench", "plot", "--help"], ["bench", "list"]])
def test_help_and_bench_listings(capsys, argv):
    out = _run(capsys, *argv)
    _check(out)
    if argv[0] == "bench" and "--help" in argv:
        assert out.startswith("usage: dualprec bench")


def test_bench_results_table_reads_at_80_columns():
    from rich.console import Console

    from bench.harness import STATUS_NOT_IMPLEMENTED, STATUS_SKIPPED_BUDGET, Record, rich_table
    from bench.workloads import POLICIES

    labels = [r.label for r in POLICIES]
    records = [Record(workload="mlp-cpu", backend=b, policy=p, impl=i, mode=m, compile_s=12.5,
                      step_time={"median": 0.0123, "iqr": 0.0004}, tflops=0.123, peak_memory_bytes=2**30,
                      baseline_ratio=1.234, extra={"ratio_noisy": True})
               for b in ("torch", "jax") for p in labels for i, m in (("hand", "eager"), ("dualprec", "compiled"))]
    records += [Record.not_run(STATUS_SKIPPED_BUDGET, "x", workload="mlp-cpu", backend="jax", policy="nf4",
                               impl="dualprec"),
                Record.not_run(STATUS_NOT_IMPLEMENTED, "x", workload="mlp-cpu", backend="torch", policy="nf4",
                               impl="dualprec")]
    console = Console(width=WIDTH, record=True)
    console.print(rich_table(records, title="mlp-cpu on a-machine (2026-01-01)"))
    text = console.export_text()
    _check(text)
    words = set(text.split())
    for word in [*labels, "1.234", "noisy", "12.3", "compiled", "dualprec", "implemented", "budget", "1024"]:
        assert word in words, word
