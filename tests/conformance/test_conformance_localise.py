"""A deliberately broken backend is caught, and the records say where and by how much."""

import dataclasses

import flax.linen as nn
import numpy as np
import optax
import pytest

from conformance.backends.base import Backend, Optim, Session, StepInfo
from conformance.checks import Context, check_forward, check_loss_scale, check_training, run_checks
from conformance.weights import WeightMap
from conformance.zoo import ZOO, canonical_weights
from conformance.zoo.flax_models import gelu
from dualprec import LossScaleConfig, Policy

FP32 = Policy.parse("32-true")


class OffDense(nn.Dense):
    def __call__(self, x):
        return super().__call__(x) * 1.001


class BrokenFc2MLP(nn.Module):
    """The zoo MLP with an error in one layer: fc2's output is 0.1% too large."""

    @nn.compact
    def __call__(self, x):
        x = gelu(nn.Dense(32, name="fc1")(x))
        x = gelu(OffDense(32, name="fc2")(x))
        return nn.Dense(8, name="head")(x)


def _ctx(backends, spec=ZOO["mlp"], policy=FP32, **kw):
    w = canonical_weights(ZOO["mlp"])
    return Context(*backends, spec, policy, str(policy), w, WeightMap.auto({k: v.shape for k, v in w.items()}), **kw)


def test_correct_pair_passes(fp32_backends):
    recs = run_checks(_ctx(fp32_backends, steps=3))
    assert [r.check for r in recs if r.status != "pass"] == []
    assert {r.check for r in recs} >= {"forward", "gradients", "train-loss", "train-params", "loss-scale"}


def test_broken_layer_is_localised(fp32_backends):
    spec = dataclasses.replace(ZOO["mlp"], build_flax=BrokenFc2MLP)
    ctx = _ctx(fp32_backends, spec=spec)
    sa, sb = ctx.sessions(Optim())
    (rec,) = check_forward(ctx, sa, sb)
    assert rec.status == "fail" and rec.where == "fc2"  # not fc1 (fine) nor head (downstream)
    assert rec.max_ulp_err > 100  # 0.1% is ~8000 ULP of float32
    assert "fc2" in rec.reason and "ULP of float32" in rec.reason


def test_wrong_optimizer_is_caught_at_the_step_it_diverges(fp32_backends):
    torch_be, jax_be = fp32_backends

    import dualprec_jax

    class LrTooHigh(dualprec_jax.Precision):
        def wrap_optimizer(self, tx):
            return super().wrap_optimizer(optax.sgd(0.05 * 2))

    ctx = _ctx((torch_be, type(jax_be)(LrTooHigh)), steps=3)
    loss, params, update = check_training(ctx)
    assert loss.status == "fail" and loss.step == 1  # step 0's loss precedes any update
    assert update.status == "fail" and update.where.startswith(jax_be.name)  # its own step is not SGD
    assert params.status == "fail" and params.where in ctx.weights
    assert len(loss.detail["series"]["loss_rel"]) == 3


@dataclasses.dataclass
class _ScriptedSession(Session):
    """A third 'backend' that replays a loss-scale trajectory: the harness needs no framework."""

    skips: tuple
    policy: Policy
    touch_params_on_skip: bool = False
    follow_rule: bool = True

    def __post_init__(self):
        from dualprec.ref.loss_scale import loss_scale_init, loss_scale_update

        self._t, self._w = 0, np.zeros(3, np.float32)
        self._state, self._update = loss_scale_init(self.policy.loss_scale), loss_scale_update
        self._steps = 0

    def param_dtypes(self):
        return {"w": "float32"}

    def params(self):
        return {"w": self._w.copy()}

    def forward(self, x):
        return x, {}

    def loss_and_grads(self, x, y):
        return 0.0, {"w": self._w}

    def train_step(self, x, y, loss_multiplier=1.0):
        skipped = self.skips[self._t] or not np.isfinite(loss_multiplier)
        if not skipped or self.touch_params_on_skip:
            self._w = self._w + 1
        if not skipped:
            self._steps += 1
        finite = not skipped if self.follow_rule else True
        self._state = self._update(self._state, finite, self.policy.loss_scale)
        self._t += 1
        return StepInfo(1.0, float(self._state.scale), self._state.counter, skipped, self._steps)


class _ScriptedBackend(Backend):
    def __init__(self, name, **kw):
        self.name, self.kw = name, kw

    def unsupported(self, policy):
        return None

    def convert_input(self, policy, x):
        return x

    convert_output = convert_input

    def session(self, spec, policy, weights, weight_map, optim):
        return _ScriptedSession(skips=(False,) * 8, policy=policy, **self.kw)


DYN = Policy.parse("16-mixed").replace(loss_scale=LossScaleConfig.dynamic(init_scale=8.0, growth_interval=2))


def _ls_ctx(a, b):
    return Context(a, b, ZOO["mlp"], DYN, "dyn", {"w": np.zeros(3)}, WeightMap({}), steps=6, overflow_steps=(1, 4))


def test_loss_scale_trajectory_matches_reference():
    rec, _ = check_loss_scale(_ls_ctx(_ScriptedBackend("x"), _ScriptedBackend("y")))
    assert rec.status == "pass", rec.reason
    ref = rec.detail["trajectory"]["ref"]
    # 8 -> skip 4 -> 4 -> grow 8 -> skip 4 -> 4 (counter 1)
    assert [s for s, _ in ref] == [8.0, 4.0, 4.0, 8.0, 4.0, 4.0]


@pytest.mark.parametrize("kw, needle", [
    ({"touch_params_on_skip": True}, "changed w on a skipped step"),
    ({"follow_rule": False}, "!= reference"),
])
def test_loss_scale_bugs_are_caught_with_the_step(kw, needle):
    rec, _ = check_loss_scale(_ls_ctx(_ScriptedBackend("ok"), _ScriptedBackend("bad", **kw)))
    assert rec.status == "fail" and needle in rec.reason and rec.step == 1
