"""bench/gpu_run.py, the one prepared GPU script: its plan's order and budget behaviour, the
error isolation of its timing helpers, and `--smoke` end to end on CPU (every row at tiny
sizes, about a minute on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# the rows the script must always write (measured, or with the reason they were not)
EXPECTED = {
    ("jax", "bf16-mixed", "jit"): {"hand", "dualprec", "autocast"},
    ("torch", "bf16-mixed", "eager"): {"hand", "dualprec"},
    ("torch", "bf16-mixed", "compiled"): {"hand", "dualprec"},
    ("torch", "fp8-vs-bf16", "compiled"): {"hand", "fp8"},
    ("jax", "fp8-delayed-vs-bf16", "jit"): {"hand", "fp8"},
    ("torch", "nf4", "eager"): {"hand", "dualprec"},
    ("jax", "nf4", "jit"): {"dualprec", "dualprec-dispatch"},
}


def test_plan_is_ordered_by_value_with_optional_rows_last():
    from bench.gpu_run import Plan, build_plan

    rows = build_plan(Plan(smoke=True))
    names = [r.name.split()[0] for r in rows]
    assert names[:7] == ["a", "b1", "b2", "c1", "c2", "d1", "d2"]
    first_optional = next(i for i, r in enumerate(rows) if r.optional)
    assert first_optional == 7 and all(r.optional for r in rows[first_optional:])
    assert any(r.name.startswith("memory") for r in rows[first_optional:])


def test_jax_timing_keeps_going_when_a_variant_fails():
    import jax.numpy as jnp

    from bench.gpu_run import _time_jax

    def good():
        return (lambda s, x: s + x), jnp.zeros(3)

    def bad():
        raise RuntimeError("no such kernel")

    out = _time_jax({"bad": bad, "good": good}, jnp.ones(3), warmup=1, rounds=2, steps=1)
    assert "no such kernel" in out["bad"]["error"]
    assert len(out["good"]["samples"]) == 2 and out["good"]["compile_s"] > 0


def test_torch_timing_keeps_going_when_a_step_fails():
    from bench.gpu_run import _time_torch

    def bad():
        raise ValueError("bad step")

    out = _time_torch({"bad": bad, "good": lambda: None}, "cpu", warmup=2, rounds=3, steps=2,
                      after_warmup=lambda: {"bit_identical": True})
    assert "bad step" in out["bad"]["error"]
    assert len(out["good"]["samples"]) == 3 and out["_after_warmup"] == {"bit_identical": True}


@pytest.mark.slow
def test_smoke_run_writes_every_row(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--smoke", "--budget", "240",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-gpu-smoke.json")
    data = json.loads(path.read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["device"] == "cpu"
    records = data["records"]
    for r in records:  # a measurement, or the reason there is none
        assert r["status"] == "ok" or r["reason"], r
        if r["status"] == "ok":
            assert r["step_time"] is None or r["step_time"]["median"] > 0
    seen: dict = {}
    for r in records:
        seen.setdefault((r["backend"], r["policy"], r["mode"]), set()).add(r["impl"])
    for key, impls in EXPECTED.items():
        assert impls <= seen.get(key, set()), (key, seen.get(key))
    # the torch rows carry the bit-identity check; the CPU smoke run has the same seeds and steps
    ident = [r for r in records if r["backend"] == "torch" and r["policy"] == "bf16-mixed"
             and r["impl"] == "dualprec" and r["status"] == "ok"]
    assert ident and all(isinstance(r["extra"].get("bit_identical"), bool) for r in ident)
    # on 2 idle cores every row fits the smoke budget and runs
    ok = {(r["backend"], r["policy"], r["mode"], r["impl"]) for r in records if r["status"] == "ok"}
    assert ("jax", "bf16-mixed", "jit", "autocast") in ok and ("torch", "fp8-vs-bf16", "compiled", "fp8") in ok
