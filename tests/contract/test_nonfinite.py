"""One non-finite rule in both backends: apply (the default without loss scaling, torch's
behaviour), skip (inherent with loss scaling), raise (naming the first bad parameter); and
both report what the step did."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dualprec_jax  # noqa: E402
import dualprec_torch  # noqa: E402
from dualprec.errors import NonFiniteGradientError  # noqa: E402

W = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
B = np.array([0.1, -0.2], np.float32)
X = np.array([[0.25, 0.5]], np.float32)  # scaled by 2**16 the float16 gradients stay finite


def torch_step(policy, poison):
    """One step of x @ W.T + b whose loss is multiplied by ``poison``: (report, weight after)."""
    prec = dualprec_torch.Precision(policy)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(B))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = prec.setup(model, opt)
    with prec.autocast():
        loss = model(torch.from_numpy(X)).float().sum() * 0.25 * poison  # 2**16 * 0.25: no float16 overflow
    prec.backward(loss)
    try:
        prec.step(opt)
        error = None
    except NonFiniteGradientError as e:
        error = e
    return prec.last_step(opt), model.weight.detach().float().numpy(), error


def jax_step(policy, poison):
    prec = dualprec_jax.Precision(policy)
    # named like torch's Linear so the reports compare ("weight", "bias" in tree order: bias first)
    params = {"weight": jnp.asarray(W), "bias": jnp.asarray(B)}
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    state = tx.init(params)

    def loss(p):
        y = prec.convert_input(jnp.asarray(X)) @ p["weight"].T + p["bias"]
        return prec.scale_loss(y.astype(jnp.float32).sum() * 0.25 * poison, state.loss_scale)

    grads = jax.grad(loss)(params)
    try:
        params, state = prec.step(tx, grads, state, params)
        error = None
    except NonFiniteGradientError as e:
        error = e
        _, state = tx.update(grads, state, params)  # what the step recorded before raising
    return prec.last_step(state, params), np.asarray(params["weight"], np.float32), error


@pytest.mark.parametrize("step", [torch_step, jax_step], ids=["torch", "jax"])
@pytest.mark.parametrize("policy, outcome, changed", [
    ("bf16-mixed", "applied", True),                 # torch without a GradScaler: NaN goes in
    ("bf16-mixed,nonfinite=skip", "skipped", False),
    ("16-mixed", "skipped", False),                  # loss scaling skips by itself
    ("32-true,nonfinite=skip", "skipped", False),
])
def test_a_nan_step_follows_the_rule(step, policy, outcome, changed):
    report, weight, error = step(policy, float("nan"))
    assert error is None and report.outcome == outcome and bool(report) is (outcome == "applied")
    assert bool(np.isnan(weight).any()) is changed
    finite_report, finite_weight, _ = step(policy, 1.0)
    assert finite_report.outcome == "applied" and not np.array_equal(finite_weight, W)


@pytest.mark.parametrize("step", [torch_step, jax_step], ids=["torch", "jax"])
@pytest.mark.parametrize("policy", ["bf16-mixed,nonfinite=raise", "16-mixed,nonfinite=raise"])
def test_raise_names_the_first_parameter(step, policy):
    report, weight, error = step(policy, float("inf"))
    assert isinstance(error, NonFiniteGradientError) and error.parameter in ("weight", "bias")
    assert error.parameter in str(error) and report.outcome == "skipped"
    np.testing.assert_array_equal(weight, W.astype(weight.dtype))  # nothing went in


def test_loss_scale_backs_off_the_same_in_both():
    t_report, _, _ = torch_step("16-mixed", float("inf"))
    j_report, _, _ = jax_step("16-mixed", float("inf"))
    assert t_report.scale == j_report.scale == 32768.0
