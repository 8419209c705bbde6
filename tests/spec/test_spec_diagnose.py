"""The spec layer of `diagnose`: statistics, policy edits, the O(N) search (driven by a
synthetic backend whose error is known exactly), the report's formats."""

import io
import math

import ml_dtypes
import numpy as np
import pytest

from dualprec import Policy, PolicyError
from dualprec.diagnose import (
    DiagnoseReport,
    Trace,
    isolate,
    promote,
    promotion_kind,
    range_fractions,
    reference_policy,
    rel_error,
    search,
    sqnr_db,
)


def test_rel_error_and_sqnr():
    ref = np.array([3.0, 4.0])
    assert rel_error(ref, ref) == 0.0 and sqnr_db(ref, ref) == math.inf
    assert rel_error(np.array([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert sqnr_db(np.array([3.0, 4.5]), ref) == pytest.approx(20.0)
    assert rel_error(np.array([np.inf, 4.0]), ref) == math.inf
    assert sqnr_db(np.array([np.nan, 4.0]), ref) == -math.inf


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_range_fractions_match_the_casts(fmt):
    """Overflow / underflow-to-zero / subnormal fractions agree with what the cast does."""
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(4000) * np.exp2(rng.integers(-150, 130, 4000))).astype(np.float32)
    x = x[(x != 0) & np.isfinite(x)]
    dt = np.float16 if fmt == "float16" else ml_dtypes.bfloat16
    finfo = ml_dtypes.finfo(dt)
    with np.errstate(over="ignore"):
        c = x.astype(dt).astype(np.float64)
    got = range_fractions(x, fmt)
    # the cast rounds: values just past the edges may round in; the statistics use the exact edges
    exact_over = np.mean(np.abs(x) > float(finfo.max))
    exact_zero = np.mean(np.abs(x.astype(np.float64)) < float(finfo.smallest_subnormal) / 2)
    assert got["overflow"] == pytest.approx(exact_over)
    assert got["underflow"] == pytest.approx(exact_zero)
    assert np.mean(np.isinf(c)) >= got["overflow"] - 1e-9
    assert np.mean(c == 0) == pytest.approx(got["underflow"], abs=2 / x.size)
    sub = (np.abs(c) < float(finfo.smallest_normal)) & (c != 0)
    assert got["subnormal"] == pytest.approx(np.mean(sub), abs=2 / x.size)


def test_range_fractions_scaled_formats():
    # per-tensor FP8: the amax maps to 448; a value 1e-4 of it is 0.0448 -> normal in e4m3 (>= 2**-6)
    x = np.array([1.0, 1e-4, 1e-7])
    f = range_fractions(x, "e4m3")
    assert f["overflow"] == 0 and f["underflow"] == pytest.approx(1 / 3) and f["subnormal"] == 0
    # NVFP4 blocks of 16: the block amax maps to 6, so 0.05 of it is 0.3: in e2m1's subnormal range [0.25, 1)
    y = np.array([1.0] + [0.05] * 15)
    g = range_fractions(y, "nvfp4")
    assert g["subnormal"] == pytest.approx(15 / 16)


def test_promote_spellings_round_trip():
    p = promote(Policy.parse("16-mixed"), "attn")
    assert str(p) == "params=float32,compute=float16,output=float32,loss_scale=dynamic,@attn=(compute=float32)"
    assert Policy.parse(str(p)) == p
    q = promote(Policy.parse("nf4"), "head")
    assert q.quantization.skip == ("head",) and not q.quantizes("head") and q.quantizes("fc1")
    f = promote(Policy.parse("bf16-mixed,fp8=current"), "fc1")
    assert f.for_module("fc1").fp8 is None and f.for_module("fc2").fp8 is not None
    assert Policy.parse(str(f)) == f
    t = promote(Policy.parse("bf16-true"), "ln")
    assert t.for_module("ln").compute_dtype == "float32" and t.for_module("ln").output_dtype == "bfloat16"
    with pytest.raises(PolicyError, match="nothing to promote"):
        promote(Policy.parse("32-true"), "head")
    assert promotion_kind(Policy.parse("32-true"), "head") is None


def test_isolate_and_reference():
    pol = Policy.parse("16-mixed")
    ref = reference_policy(pol)
    assert str(ref) == "32-true" and str(reference_policy(Policy.parse("32-true"))) == "64-true"
    iso = isolate(pol, "attn", ref)
    assert iso.for_module("attn.qkv").compute_dtype == "float16"
    assert iso.for_module("mlp").compute_dtype == "float32"
    assert iso.loss_scale == pol.loss_scale


# ----- the search, on a synthetic backend: each module under low precision adds a known error
MODULES = [("a", "Block"), ("a.x", "Linear"), ("a.y", "Linear"), ("b", "Linear"), ("c", "Linear")]
COST = {"a": 0.3, "a.x": 0.02, "a.y": 0.01, "b": 0.2, "c": 0.005}  # "a": its own ops beyond its children


def fake_run(calls):
    def run(policy, capture):
        calls.append(str(policy))
        err = sum(w for path, w in COST.items() if promotion_kind(policy, path) is not None
                  and not (path == "a" and promotion_kind(policy, "a") is None))
        outs = [{p: np.array([1.0 + (COST[p] if promotion_kind(policy, p) else 0.0)]) for p, _ in MODULES}] * 2
        return Trace([2.0 * (1 + err)] * 2, [{"b.weight": np.array([1.0 + err, 1.0])}] * 2, [1.0] * 2,
                     [False] * 2, outputs=outs if capture else None)
    return run


def test_search_ranks_by_own_error_and_suggests_the_fewest_promotions():
    calls = []
    rep = search(fake_run(calls), "bf16-mixed", MODULES, target=0.05, model="fake", steps=2)
    assert rep.ranking[:2] == ["a", "b"]
    assert rep.module("a").own_error == pytest.approx(0.3)   # iso(a) = 0.33 minus its children's 0.03
    assert rep.module("a.x").own_error == pytest.approx(0.02)
    assert rep.overrides_added == ["a", "b"]
    assert rep.meets_target and rep.suggested_error == pytest.approx(0.005)
    p = Policy.parse(rep.suggested)
    assert p.for_module("a.x").compute_dtype == "float32" and p.for_module("c").compute_dtype == "bfloat16"
    n = len(rep.ranking)
    assert rep.runs == len(calls) <= 2 + 2 * n + 2 * len(rep.overrides_added)  # O(N)
    assert rep.error == pytest.approx(0.535)  # every module under bfloat16: the sum of the costs


def test_search_prunes_a_promotion_the_target_does_not_need():
    global COST
    saved = dict(COST)
    try:
        COST.update({"a": 0.05, "b": 0.3})  # "a" ranks second, then only b is needed under 0.1
        rep = search(fake_run([]), "bf16-mixed", MODULES, target=0.1, gains=False)
        assert rep.ranking[0] == "b" and rep.overrides_added == ["b"] and rep.meets_target
    finally:
        COST.clear()
        COST.update(saved)


def test_search_rejects_bad_target_and_candidates():
    with pytest.raises(ValueError, match="target"):
        search(fake_run([]), "bf16-mixed", MODULES, target=0)
    with pytest.raises(ValueError, match="not modules of this model"):
        search(fake_run([]), "bf16-mixed", MODULES, candidates=["nope"])


def test_report_formats():
    rep = search(fake_run([]), "bf16-mixed", MODULES, target=0.05, model="fake", steps=2)
    back = DiagnoseReport.from_json(rep.to_json())
    assert back.ranking == rep.ranking and back.suggested == rep.suggested
    assert back.module("a").own_error == pytest.approx(rep.module("a").own_error)
    md = rep.to_markdown()
    assert rep.suggested in md and "| 1 | a |" in md
    from rich.console import Console

    buf = io.StringIO()
    rep.render(Console(file=buf, width=80))
    lines = buf.getvalue().splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert any(line.split()[:2] == ["1", "a"] for line in lines if line.strip())


def test_a_long_suggested_policy_wraps_after_commas_at_80_columns():
    """The terminal report never breaks the suggested policy inside a name: its lines join
    back into the canonical string a user copies."""
    import io

    from rich.console import Console

    from dualprec import Policy
    from dualprec.diagnose import DiagnoseReport

    policy = str(Policy.parse("16-mixed,@blocks.0.attn.scores=(compute=float32),"
                              "@blocks.1.mlp.norm=(compute=float32),@head=(compute=float32)"))
    assert len(policy) > 80
    report = DiagnoseReport(backend="torch", model="m", policy="16-mixed", reference="32-true", steps=1,
                            target=0.05, loss_error=1.0, grad_error=1.0, error=1.0, modules=[], ranking=[],
                            suggested=policy, suggested_error=1e-3, suggested_loss_error=1e-3,
                            suggested_grad_error=1e-3, meets_target=True, overrides_added=[],
                            loss_scale={}, timings={}, runs=3, losses={}, failures=[])
    out = io.StringIO()
    report.render(Console(file=out, width=80, force_terminal=False), width=80)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    start = next(i for i, line in enumerate(lines) if line.startswith("suggested: "))
    end = next(i for i, line in enumerate(lines) if line.startswith("  verified error"))
    joined = "".join(line.strip() for line in lines[start:end]).removeprefix("suggested: ")
    assert joined == policy
