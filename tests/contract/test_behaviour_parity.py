"""One scenario, two backends, one set of expectations: `dualprec_torch.Precision` and
`dualprec_jax.Precision` must behave the same, not only share names.

The scenario: construct with a device (its name, the framework's device object, a
`dualprec.DeviceCaps`), check, report before any step, step with finite / inf / NaN gradients
under each non-finite rule, report after the step, state_dict, load (into a fresh Precision
and into the same one), report after the load, state_dict round trip; and `dualprec explain`
for every preset and a grid of combinations agrees with what each constructor accepts.

The model is y = x @ W.T + b with the poison (1, inf or NaN) multiplying x @ W.T only, so only
the weight's gradient goes bad and both backends must name ``weight`` (JAX orders a dict's
leaves by key, bias first, so poisoning both would name different first parameters).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dualprec_jax  # noqa: E402
import dualprec_torch  # noqa: E402
from dualprec import DeviceCaps, Policy, explain, presets, registry  # noqa: E402
from dualprec.errors import NonFiniteGradientError, PolicyError, UnsupportedPolicyError  # noqa: E402

W = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
B = np.array([0.1, -0.2], np.float32)
X = np.array([[0.25, 0.5]], np.float32)  # times 2**16 the float16 gradients stay finite
LR = 0.125


def _h100(backend):
    return DeviceCaps("cuda", "H100", (9, 0), backend=backend, bitsandbytes=True, transformer_engine=True)


class TorchSide:
    name = "torch"
    Precision = dualprec_torch.Precision

    @staticmethod
    def device_forms():
        return ["cpu", torch.device("cpu"), dualprec_torch.Precision("32-true", device="cpu").caps]

    def __init__(self, policy, device="cpu"):
        self.prec = dualprec_torch.Precision(policy, device=device)
        self.model = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.model.weight.copy_(torch.from_numpy(W))
            self.model.bias.copy_(torch.from_numpy(B))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.model, self.opt = self.prec.setup(self.model, self.opt)

    def step(self, poison):
        """One training step; returns the NonFiniteGradientError it raised, or None."""
        self.opt.zero_grad()
        with self.prec.autocast():
            x = torch.from_numpy(X)
            y = torch.nn.functional.linear(x, self.model.weight) * poison + self.model.bias
            loss = y.float().sum() * 0.25
        self.prec.backward(loss)
        try:
            self.prec.step(self.opt)
        except NonFiniteGradientError as e:
            return e
        finally:
            self.prec.update()
        return None

    def last_step(self):
        return self.prec.last_step(self.opt)

    def weight(self):
        return self.model.weight.detach().float().numpy()

    def state_dict(self):
        return self.prec.state_dict()

    def load_state_dict(self, state):
        self.prec.load_state_dict(state)


class JaxSide:
    name = "jax"
    Precision = dualprec_jax.Precision

    @staticmethod
    def device_forms():
        return ["cpu", jax.devices("cpu")[0], dualprec_jax.Precision("32-true", device="cpu").caps]

    def __init__(self, policy, device="cpu"):
        self.prec = dualprec_jax.Precision(policy, device=device)
        self.params = self.prec.cast_to_param({"weight": jnp.asarray(W), "bias": jnp.asarray(B)})
        self.tx = self.prec.wrap_optimizer(optax.sgd(LR))
        self.state = self.tx.init(self.params)

    def step(self, poison):
        prec, state = self.prec, self.state

        def loss(p):
            x = prec.convert_input(jnp.asarray(X))
            y = (x @ prec.convert_input(p["weight"]).T) * poison + p["bias"]
            return prec.scale_loss(y.astype(jnp.float32).sum() * 0.25, state.loss_scale)

        grads = jax.grad(loss)(self.params)
        try:
            self.params, self.state = prec.step(self.tx, grads, state, self.params)
        except NonFiniteGradientError as e:
            _, self.state = self.tx.update(grads, state, self.params)  # the update recorded before raising
            return e
        return None

    def last_step(self):
        return self.prec.last_step(self.state, self.params)

    def weight(self):
        return np.asarray(self.params["weight"], np.float32)

    def state_dict(self):
        return self.prec.state_dict(self.state)

    def load_state_dict(self, state):
        self.state, _ = self.prec.load_state_dict(state, self.state)


SIDES = [TorchSide, JaxSide]
IDS = ["torch", "jax"]


# ----- construction and check ----------------------------------------------------------------
@pytest.mark.parametrize("side", SIDES, ids=IDS)
def test_every_device_form_is_taken_and_check_uses_the_precisions_own_device(side):
    policy = Policy.parse("16-mixed")
    for device in side.device_forms():
        prec = side.Precision(policy, device=device)
        assert prec.caps.platform == "cpu", device
        assert prec.check() == policy.check(prec.caps)
        assert prec.check(device) == policy.check(prec.caps), f"check({device!r})"
    # a Precision built for another device checks against that device, not this machine's
    te = Policy.parse("transformer-engine")
    h100 = _h100(side.name)
    prec = side.Precision(te, device=h100)
    assert prec.caps == h100
    assert prec.check().ok and prec.check() == te.check(h100)
    assert not prec.check("cpu").ok  # fp8 through Transformer Engine needs a GPU
    assert not prec.check(side.device_forms()[1]).ok


def test_check_reports_agree_between_backends():
    precs = [s.Precision("32-true", device="cpu") for s in SIDES]
    for name, policy in presets().items():
        t, j = (policy.check(prec.caps) for prec in precs)
        # notes may name one backend's own mechanism (JAX turns x64 on); the verdict may not differ
        assert (t.ok, t.problems, t.fallback) == (j.ok, j.problems, j.fallback), name


# ----- steps and reports ----------------------------------------------------------------------
RULES = [  # policy, what a non-finite step does
    ("bf16-mixed", "apply"),
    ("bf16-mixed,nonfinite=skip", "skip"),
    ("bf16-mixed,nonfinite=raise", "raise"),
    ("16-mixed", "skip"),  # dynamic loss scaling skips by itself
    ("16-mixed,nonfinite=raise", "raise"),
    ("32-true,nonfinite=skip", "skip"),
    ("32-true", "apply"),
]
POISONS = {"finite": 1.0, "inf": math.inf, "nan": math.nan}


def _expected(policy, rule, poison):
    """(report fields before, report fields after, error parameter, weight changed, weight finite)."""
    p = Policy.parse(policy)
    init = p.loss_scale.init_scale if p.loss_scale.enabled else 1.0
    if math.isfinite(poison) or rule == "apply":
        scale = init  # one finite step: no growth before the interval
        return ("none", init, None), ("applied", scale, None), None, True, math.isfinite(poison)
    scale = init * p.loss_scale.backoff_factor if p.loss_scale.kind == "dynamic" else init
    return ("none", init, None), ("skipped", scale, "weight"), ("weight" if rule == "raise" else None), False, True


def _fields(report):
    return (report.outcome, report.scale, report.nonfinite_parameter)


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
@pytest.mark.parametrize("policy,rule", RULES, ids=[r[0] for r in RULES])
def test_one_step_under_each_rule(policy, rule, poison):
    before, after, error_param, changed, finite = _expected(policy, rule, POISONS[poison])
    seen = {}
    for side in SIDES:
        run = side(policy)
        assert _fields(run.last_step()) == before, (side.name, "before any step")
        error = run.step(POISONS[poison])
        if error_param is None:
            assert error is None, (side.name, error)
        else:
            assert isinstance(error, NonFiniteGradientError) and error.parameter == error_param, (side.name, error)
        report = run.last_step()
        assert _fields(report) == after, (side.name, _fields(report))
        assert bool(report) is (after[0] == "applied")
        weight = run.weight()
        assert (not np.array_equal(weight, W.astype(weight.dtype))) is changed, side.name
        assert bool(np.isfinite(weight).all()) is finite, side.name
        seen[side.name] = (_fields(report), weight)
    assert seen["torch"][0] == seen["jax"][0]


# ----- state: round trip and the report after a load -------------------------------------------
def _comparable(state):
    """The backend-neutral part of a precision state (tensors as float lists)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _comparable(v)
        elif hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
            out[k] = np.asarray(v, np.float32).tolist()
        elif hasattr(v, "item"):
            out[k] = v.item()
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("policy", ["16-mixed", "bf16-mixed,nonfinite=skip", "32-true"])
def test_state_round_trip_and_last_step_after_a_load(policy):
    states = {}
    for side in SIDES:
        run = side(policy)
        run.step(1.0)
        run.step(math.inf)
        run.step(1.0)
        state = run.state_dict()
        states[side.name] = _comparable(state)

        fresh = side(policy)
        fresh.load_state_dict(state)
        assert _comparable(fresh.state_dict()) == states[side.name], side.name  # round trip
        scale = state["loss_scale"]["scale"]
        assert _fields(fresh.last_step()) == ("none", float(scale), None), (side.name, "fresh after load")

        assert run.last_step().outcome == "applied"
        run.load_state_dict(state)  # into the Precision that stepped: no step since the load
        assert _fields(run.last_step()) == ("none", float(scale), None), (side.name, "same after load")
        run.step(1.0)
        assert run.last_step().outcome == "applied"
    assert states["torch"] == states["jax"]


# ----- explain agrees with the constructors -----------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")
COMBINATIONS = [f"p={p},c={c}" for p, c in itertools.product(DTYPES, DTYPES)] + [
    "p=f32,c=bf16,o=bf16", "p=f32,c=f16,loss_scale=none", "bf16-true,master=true",
    "bf16-mixed,nonfinite=raise", "16-mixed,loss_scale=static(1024)", "bf16-mixed,@head=(p=bf16,c=f32)",
    "p=f32,c=bf16,@head=32-true",
]


def _accepts(side, policy) -> str | None:
    """None when ``side``'s constructor takes ``policy`` on a device that runs everything,
    else its UnsupportedPolicyError message."""
    kwargs = {"enable_x64": False} if side is JaxSide else {}
    try:
        side.Precision(policy, device=_h100(side.name), **kwargs)
    except UnsupportedPolicyError as e:
        return str(e)
    except PolicyError as e:  # JAX without x64: a process setting, not a path the backend lacks
        assert "jax_enable_x64" in str(e)
    return None


@pytest.mark.parametrize("name", list(presets()) + COMBINATIONS)
def test_explain_says_what_each_constructor_accepts(name):
    policy = presets().get(name) or Policy.parse(name)
    described = explain(policy)["backends"]
    for side in SIDES:
        lines = described[side.name]
        refused = _accepts(side, policy)
        if refused is None:
            assert not [k for k, v in lines.items() if registry.REFUSED in v or registry.NOT_AVAILABLE in v], \
                (side.name, name, lines)
        else:
            assert lines["mechanism"].endswith(refused), (side.name, name)
            assert all(registry.REFUSED in v for v in lines.values())
    assert list(described["torch"]) == list(described["jax"])
    if not any(registry.REFUSED in v for b in described.values() for v in b.values()):
        spec_lines = ("params", "outputs", "optimizer", "loss scaling")  # the spec's, not a backend's
        assert [described["torch"][k] for k in spec_lines] == [described["jax"][k] for k in spec_lines]


def test_the_refusal_the_issue_names():
    refused = _accepts(TorchSide, Policy.parse("p=bf16,c=f32"))
    assert refused and "autocast" in refused
    text = explain(Policy.parse("p=bf16,c=f32"))["backends"]
    assert text["torch"]["mechanism"].startswith(registry.REFUSED)
    assert registry.REFUSED not in text["jax"]["mechanism"]


def test_jax_train_state_reports_none_before_a_step_and_check_step_passes():
    from dualprec_jax.train_state import TrainState

    prec = dualprec_jax.Precision("bf16-mixed,nonfinite=raise")
    params = {"weight": jnp.asarray(W), "bias": jnp.asarray(B)}
    state = TrainState.create(apply_fn=None, params=params, tx=optax.sgd(LR), precision=prec)
    assert _fields(prec.last_step(state)) == ("none", 1.0, None)
    assert state.check_step() is state  # nothing skipped: no step yet
    bad = {"weight": jnp.full_like(params["weight"], jnp.nan), "bias": jnp.zeros_like(params["bias"])}
    state = state.apply_gradients(grads=bad)
    assert _fields(prec.last_step(state)) == ("skipped", 1.0, "weight")
    with pytest.raises(NonFiniteGradientError, match="weight"):
        state.check_step()
