"""A Dense under the policy agrees with torch CPU autocast wherever the arithmetic decides the
result; stock Flax `Dense(dtype=bf16)` (bf16 product, then a bf16 bias add) agrees on about
three quarters.

Two float32 GEMMs with different summation orders (XLA vs oneDNN, or one CPU vs another) may
round a bf16 output differently only where the exact result lies within the reordering error of
a bf16 rounding boundary.  The exact result is computed here in float64 from the bf16 operands;
an element is *decided* when every value within ``acc(K) * sum|terms|`` of it rounds to the same
bf16 number (acc(K) = 4 sqrt(K) u + 4 u, the conformance error model, docs/conformance.md).
Decided elements must be bit-equal on both sides and equal to the correctly rounded result; the
share of undecided elements is small (9% of the forward here), so the test keeps its teeth on any CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

from dualprec_jax import Precision

U32 = 2.0 ** -24
BF16 = ml_dtypes.bfloat16


def _acc(k: int) -> float:
    return (4 * np.sqrt(k) + 4) * U32


def _bf16(a):
    return np.asarray(a, np.float32).astype(BF16).astype(np.float64)


def _decided(exact: np.ndarray, abs_sum: np.ndarray, k: int) -> np.ndarray:
    """Elements whose bf16 rounding no float32 summation order within the model can change."""
    err = _acc(k) * abs_sum
    lo = (exact - err).astype(np.float32).astype(BF16)
    hi = (exact + err).astype(np.float32).astype(BF16)
    return lo == hi


def _agreement(n=256, k=512, m=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), np.float32)
    w = (rng.standard_normal((k, m), np.float32) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w.T.copy()), torch.from_numpy(b))
    ref = ref.float().numpy()
    variables = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    with Precision("bf16-mixed").autocast():
        ours = nn.Dense(m).apply(variables, jnp.asarray(x))
    stock = nn.Dense(m, dtype=jnp.bfloat16).apply(variables, jnp.asarray(x))
    assert ours.dtype == stock.dtype == jnp.bfloat16
    xb, wb, bb = _bf16(x), _bf16(w), _bf16(b)
    exact = xb @ wb + bb
    decided = _decided(exact, np.abs(xb) @ np.abs(wb) + np.abs(bb), k)
    rounded = exact.astype(np.float32).astype(BF16).astype(np.float32)
    return np.asarray(ours.astype(jnp.float32)), np.asarray(stock.astype(jnp.float32)), ref, rounded, decided


def test_dense_matches_torch_autocast_wherever_the_arithmetic_decides():
    ours, stock, ref, rounded, decided = _agreement()
    print(f"undecided by the reordering bound: {1 - decided.mean():.2%}; bitwise-equal to torch: "
          f"policy Dense {np.mean(ours == ref):.2%}, stock Dense(dtype=bf16) {np.mean(stock == ref):.2%}")
    assert decided.mean() > 0.85  # the criterion leaves most elements decided (91% here)
    np.testing.assert_array_equal(ours[decided], ref[decided])
    np.testing.assert_array_equal(ours[decided], rounded[decided])  # both sides: one rounding
    # undecided elements: at most one bf16 step apart (adjacent roundings of the same value)
    assert np.all(np.abs(ours - ref) <= np.abs(rounded) * 2.0 ** -7)
    stock_share = np.mean(stock[decided] == ref[decided])
    assert 0.5 < stock_share < 0.9, stock_share  # the documented ~74%: the bias rounds twice


def test_dense_gradients_match_torch_autocast():
    """Backward as autocast computes it: bf16 cotangent, bf16 GEMMs accumulated in fp32."""
    rng = np.random.default_rng(1)
    n, k, m = 48, 384, 96
    x = rng.standard_normal((n, k), np.float32)
    w = (rng.standard_normal((k, m), np.float32) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    g = rng.standard_normal((n, m), np.float32)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w.T.copy(), b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.linear(tx, tw, tb)
    y.backward(torch.from_numpy(g).to(torch.bfloat16))
    prec = Precision("bf16-mixed")

    def f(x, kernel, bias):
        with prec.autocast():
            return nn.Dense(m).apply({"params": {"kernel": kernel, "bias": bias}}, x)

    _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    gx, gw, gb = jax.jit(vjp)(jnp.asarray(g).astype(jnp.bfloat16))
    assert np.mean(np.asarray(gb) == tb.grad.numpy()) == 1.0
    # gx = g @ w (K = m), gw = x.T @ g (K = n): the GEMMs of the bf16 cast's backward, bf16
    # operands, float32 accumulation, one rounding to bf16, then the cast's backward to float32
    # (torch's autocast backward; ours the same).  Decided elements as for the forward.
    gb16, xb, wb = _bf16(g), _bf16(x), _bf16(w)
    for got, want, exact, abs_sum, k in (
            (np.asarray(gx), tx.grad.numpy(), gb16 @ wb.T, np.abs(gb16) @ np.abs(wb.T), m),
            (np.asarray(gw), tw.grad.numpy().T, xb.T @ gb16, np.abs(xb.T) @ np.abs(gb16), n)):
        decided = _decided(exact, abs_sum, k)
        rounded = exact.astype(np.float32).astype(BF16).astype(np.float32)
        assert decided.mean() > 0.85, decided.mean()
        np.testing.assert_array_equal(got[decided], want[decided])
        np.testing.assert_array_equal(got[decided], rounded[decided])
        assert np.all(np.abs(got - want) <= np.abs(rounded) * 2.0 ** -7)


def test_backward_gemms_take_half_operands_off_cpu(monkeypatch):
    """Plain autodiff of a float32-accumulating dot promotes the cotangent and runs both
    backward GEMMs in float32 (1.9x slower on an H200); ours keeps them in bf16."""
    from dualprec_jax import ops

    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    dot = ops.accumulating_dot_general(jnp.float32)
    a = jnp.ones((8, 16), jnp.bfloat16)
    k = jnp.ones((16, 4), jnp.bfloat16)
    loss = lambda a, k: dot(a, k, (((1,), (0,)), ((), ()))).astype(jnp.bfloat16).astype(jnp.float32).sum()  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, k)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward + two gradient GEMMs
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16], e
        assert e.params["preferred_element_type"] == jnp.float32
