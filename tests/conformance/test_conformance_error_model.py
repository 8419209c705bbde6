"""The error model of the tolerance tier: its bounds admit every summation order a correct
kernel may use and reject the bugs the suite exists to catch, independently of this CPU.

The "other kernels" here are written out in NumPy (the same float32 products summed in
other orders), so these tests say the same on every machine."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from conformance.numerics import measure
from conformance.tolerances import (
    MathModeMismatch,
    ModelShape,
    binomial_upper,
    check_math_modes,
    layer_bound,
    tolerance,
)
from dualprec import Policy

BF16 = ml_dtypes.bfloat16


def _sum_in_order(prod: np.ndarray, order: str, chunk: int = 7) -> np.ndarray:
    """Sum ``prod`` (..., K) over its last axis in float32, in one of several orders."""
    k = prod.shape[-1]
    if order == "sequential":
        acc = np.zeros(prod.shape[:-1], np.float32)
        for i in range(k):
            acc = acc + prod[..., i]
        return acc
    if order == "reversed":
        acc = np.zeros(prod.shape[:-1], np.float32)
        for i in reversed(range(k)):
            acc = acc + prod[..., i]
        return acc
    if order == "chunked":  # partial sums of `chunk` terms, added last chunk first
        parts = [_sum_in_order(prod[..., i:i + chunk], "sequential") for i in range(0, k, chunk)]
        acc = np.zeros(prod.shape[:-1], np.float32)
        for p in reversed(parts):
            acc = acc + p
        return acc
    if order == "pairwise":
        a = prod
        while a.shape[-1] > 1:
            if a.shape[-1] % 2:
                a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), np.float32)], axis=-1)
            a = a[..., 0::2] + a[..., 1::2]
        return a[..., 0]
    raise ValueError(order)


def _linear(x, w, b, dtype, order: str, bias_after_rounding=False, bf16_accumulate=False):
    """A linear layer as a CUDA-autocast kernel computes it: operands in ``dtype``, float32
    products and sums (in ``order``), the bias added in float32, one rounding."""
    xs = x.astype(dtype).astype(np.float32)
    ws = w.astype(dtype).astype(np.float32)
    prod = xs[:, None, :] * ws[None, :, :]  # exact for half operands
    if bf16_accumulate:
        acc = np.zeros(prod.shape[:-1], BF16)
        for i in range(prod.shape[-1]):
            acc = (acc.astype(np.float32) + prod[..., i]).astype(BF16)
        y = acc.astype(np.float32)
    else:
        y = _sum_in_order(prod, order)
    bb = b.astype(dtype).astype(np.float32)
    if bias_after_rounding:
        return (y.astype(dtype).astype(np.float32) + bb).astype(dtype)
    return (y + bb).astype(dtype)


ORDERS = ("sequential", "reversed", "chunked", "pairwise")
SHAPE = ModelShape(n_round=5, n_reduce=128, n_layers=3)


def _data(seed, k=128, n=96, m=64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k)).astype(np.float32), (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32),
            rng.standard_normal(n).astype(np.float32) * 0.1)


@pytest.mark.parametrize("policy,dtype", [("bf16-mixed", BF16), ("16-mixed", np.float16), ("32-true", np.float32)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_summation_order_passes_the_layer_bound(policy, dtype, seed):
    x, w, b = _data(seed)
    pol = Policy.parse(policy)
    outs = {o: _linear(x, w, b, dtype, o) for o in ORDERS}
    assert any(not np.array_equal(outs["sequential"], outs[o]) for o in ORDERS[1:]) or dtype != np.float32, \
        "the orders should give other float32 bits (else the test proves nothing)"
    for o in ORDERS[1:]:
        st = measure(outs[o], outs["sequential"])
        bound = layer_bound(pol, SHAPE, st.dtype, st.size)
        assert bound.judge(st) is None, (o, bound.judge(st))


@pytest.mark.parametrize("policy,dtype", [("bf16-mixed", BF16), ("16-mixed", np.float16)])
def test_bias_after_rounding_fails_the_share_criterion(policy, dtype):
    x, w, b = _data(3)
    pol = Policy.parse(policy)
    ref = _linear(x, w, b, dtype, "sequential")
    bug = _linear(x, w, b, dtype, "reversed", bias_after_rounding=True)
    st = measure(bug, ref)
    problem = layer_bound(pol, SHAPE, st.dtype, st.size).judge(st)
    assert problem is not None and "not bitwise equal" in problem, (st, problem)


@pytest.mark.parametrize("policy,dtype", [("32-true", np.float32), ("bf16-mixed", BF16)])
def test_a_gemm_accumulated_in_bfloat16_fails(policy, dtype):
    x, w, b = _data(4)
    pol = Policy.parse(policy)
    ref = _linear(x, w, b, dtype, "sequential")
    bug = _linear(x, w, b, dtype, "sequential", bf16_accumulate=True)
    st = measure(bug, ref)
    assert layer_bound(pol, SHAPE, st.dtype, st.size).judge(st) is not None


def test_layernorm_variance_in_float16_fails_under_float32_outputs():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 128)) * 3 + 1).astype(np.float32)

    def ln(x, var_half, order):
        mean = _sum_in_order(x, order) / np.float32(x.shape[-1])
        d = x - mean[:, None]
        var = _sum_in_order(d * d, order) / np.float32(x.shape[-1])
        if var_half:
            var = var.astype(np.float16).astype(np.float32)
        return d / np.sqrt(var + np.float32(1e-5))[:, None]

    pol = Policy.parse("bf16-mixed")
    good = measure(ln(x, False, "pairwise"), ln(x, False, "sequential"))
    assert layer_bound(pol, SHAPE, good.dtype, good.size).judge(good) is None
    bad = measure(ln(x, True, "pairwise"), ln(x, False, "sequential"))
    assert layer_bound(pol, SHAPE, bad.dtype, bad.size).judge(bad) is not None


def test_binomial_upper_is_above_the_mean_and_capped():
    assert binomial_upper(0.0, 1000) == pytest.approx(3 / 1000)
    assert binomial_upper(0.01, 10_000) > 0.01
    assert binomial_upper(0.5, 10) == 1.0
    assert binomial_upper(0.1, 0) == 1.0


def test_half_leaf_bound_is_one_rounding_and_float32_bound_follows_k():
    bf = layer_bound(Policy.parse("bf16-mixed"), SHAPE, "bfloat16", 1000)
    assert 1.0 <= bf.max_ulp < 1.01 and bf.max_neq < 0.01
    small = layer_bound(Policy.parse("32-true"), ModelShape(1, 16, 1), "float32", 100).max_ulp
    big = layer_bound(Policy.parse("32-true"), ModelShape(1, 1024, 1), "float32", 100).max_ulp
    assert big > small * 4  # sqrt(K) growth
    # quantized activations: no share criterion
    assert layer_bound(Policy.parse("int8"), SHAPE, "float16", 1000, share=False).max_neq is None


def test_tf32_bounds_are_wider_than_ieee():
    pol = Policy.parse("32-true")
    assert tolerance(pol, SHAPE, "tf32").forward > 10 * tolerance(pol, SHAPE, "ieee").forward
    assert (layer_bound(pol, SHAPE, "float32", 100, math_mode="tf32").max_ulp
            > 100 * layer_bound(pol, SHAPE, "float32", 100).max_ulp)


def test_a_tf32_run_is_not_compared_with_a_strict_float32_one():
    assert check_math_modes({"torch": "ieee", "jax": "ieee"}) == "ieee"
    assert check_math_modes({"torch": "tf32", "jax": "tf32"}) == "tf32"
    with pytest.raises(MathModeMismatch) as e:
        check_math_modes({"torch": "ieee", "jax": "tf32"})
    msg = str(e.value)
    assert "torch computes float32 matmuls in IEEE" in msg and "jax computes float32 matmuls in TF32" in msg
    assert "jax_default_matmul_precision" in msg and "\n" not in msg


def test_the_cli_refuses_mismatched_math_modes(monkeypatch, capsys):
    from conformance import cli
    from conformance.backends.jax_backend import JaxBackend

    monkeypatch.setattr(JaxBackend, "float32_matmul_mode", lambda self: "tf32")
    rc = cli.main(["--policy", "32-true", "--model", "mlp"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to compare" in err and "TF32" in err


def test_reorder_mode_changes_bits_but_not_dtypes():
    """DUALPREC_CONFORMANCE_REORDER really is another kernel: other float32 bits for a GEMM,
    the same dtypes (CUDA autocast's) under autocast; in a subprocess (it stays on)."""
    code = r"""
import hashlib, numpy as np, torch, torch.nn.functional as F
from conformance import kernels
torch.manual_seed(0)
x, w, b = torch.randn(64, 300), torch.randn(96, 300), torch.randn(96)
c = torch.randn(4, 16, 10, 10); k = torch.randn(8, 16, 3, 3)
plain = (F.linear(x, w, b), x @ w.T, F.conv2d(c, k))
with torch.autocast("cpu", dtype=torch.bfloat16):
    hp = F.linear(x, w, b)
assert kernels.install_from_env()
re = (F.linear(x, w, b), x @ w.T, F.conv2d(c, k))
with torch.autocast("cpu", dtype=torch.bfloat16):
    hr = F.linear(x, w, b)
import json
print(json.dumps([[bool(torch.equal(p, r)) for p, r in zip(plain, re)],
      [float(((p - r).abs() / (p.abs() + p.abs().mean())).max()) for p, r in zip(plain, re)],
      str(hr.dtype), float((hp.float() - hr.float()).abs().max())]))
"""
    env = dict(os.environ, DUALPREC_CONFORMANCE_REORDER="5")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    equal, rel, dtype, half_diff = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(equal), f"each reordered op should give other bits: {equal}"
    assert max(rel) < 1e-5 and dtype == "torch.bfloat16" and half_diff < 0.1


def test_reorder_env_must_be_a_chunk_length(monkeypatch):
    from conformance import kernels

    monkeypatch.setenv(kernels.REORDER_ENV, "fast")
    monkeypatch.setattr(kernels, "_installed", False)
    with pytest.raises(ValueError, match="expected a chunk length"):
        kernels.install_from_env()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["avx2", "sse-1thread", "reorder-7"])
def test_default_matrix_passes_under_other_kernels(config):
    """The main job's verdict does not depend on the kernels: exit 0 under each config."""
    from conformance import kernels

    r = kernels.run_config(config)
    assert r["rc"] == 0 and r["fail"] == 0 and r["error"] == 0, r
    assert r["pass"] > 350, r


def test_terminal_output_fits_80_columns_when_checks_fail():
    """The matrix, the failure lines and the summary at 80 columns: nothing cut, nothing wider."""
    from rich.console import Console

    from conformance.records import Record
    from conformance.report import failure_lines, matrix_table, summary_line

    long_reason = ("first divergence at blocks.0.attn.proj: 72.3% of elements not bitwise equal > bound 2.0% "
                   "(max 5 ULP of bfloat16; 5 rounding(s) of bfloat16 after K=128 sums)")
    recs = []
    for policy in ("transformer-engine-float16", "bf16-mixed+head-f32", "32-true"):
        for model in ("mlp", "transformer", "cnn", "opbyop"):
            recs += [Record(policy, model, "forward", "tolerance", "pass") for _ in range(11)]
            recs.append(Record(policy, model, "layers", "tolerance", "fail", reason=long_reason,
                               where="blocks.0.attn.proj"))
            recs.append(Record(policy, model, "gradients", "tolerance", "error", reason="raised RuntimeError: " + "x" * 150))
    recs.append(Record("nf4", "mlp", "fp8-scales", "bit-exact", "skip", reason="known divergence: " + "word " * 40))
    console = Console(width=80, record=True, force_terminal=False)
    console.print(matrix_table(recs))
    for line in failure_lines(recs, width=79):
        console.print(line, markup=False, highlight=False, overflow="fold")
    console.print(summary_line(recs, 61.3))
    text = console.export_text()
    widths = [len(ln) for ln in text.splitlines()]
    assert max(widths) <= 80, max(widths)
    assert "…" not in text
    assert "transformer-engine-float16" in text and "72.3% of elements not bitwise equal > bound 2.0%" in \
        " ".join(ln.strip() for ln in text.splitlines())
