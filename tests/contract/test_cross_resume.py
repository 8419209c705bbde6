"""A run checkpointed in one framework resumes in the other: the loss-scale trajectory goes on
bit for bit, the parameters within tolerance (16-mixed MLP, overflows injected before and
after the checkpoint, SGD so the optimizer itself has no state to carry)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

from conformance.backends.base import Optim  # noqa: E402
from conformance.backends.jax_backend import JaxBackend  # noqa: E402
from conformance.backends.torch_backend import TorchBackend  # noqa: E402
from conformance.weights import WeightMap  # noqa: E402
from conformance.zoo import canonical_weights, get  # noqa: E402
from dualprec import Policy, checkpoint  # noqa: E402
from dualprec.errors import CheckpointError  # noqa: E402

# 16-mixed with growth every 2 finite steps, so the trajectory both grows and backs off in 10 steps
POLICY = Policy.parse("16-mixed,loss_scale=dynamic(interval=2)")
STEPS, SPLIT, OVERFLOWS = 10, 5, (2, 7)
SPEC = get("mlp")
OPTIM = Optim("sgd", 0.05)


def _session(backend, policy, weights):
    wm = WeightMap.auto({k: v.shape for k, v in weights.items()})
    return backend.session(SPEC, policy, weights, wm, OPTIM)


def _steps(session, start, stop):
    out = []
    for i in range(start, stop):
        x, y = SPEC.batch(seed=i)
        info = session.train_step(x, y, float("inf") if i in OVERFLOWS else 1.0)
        out.append((np.float32(info.scale), info.counter, info.skipped))
    return out




def _state(session):
    from conformance.backends.jax_backend import JaxSession

    if isinstance(session, JaxSession):
        return session.prec.state_dict(session.opt_state)
    return session.prec.state_dict()


def _load(session, state):
    from conformance.backends.jax_backend import JaxSession

    if isinstance(session, JaxSession):
        session.opt_state, _ = session.prec.load_state_dict(state, session.opt_state)
    else:
        session.prec.load_state_dict(state)


@pytest.fixture(scope="module")
def backends():
    return {"torch": TorchBackend(), "jax": JaxBackend()}


@pytest.fixture(scope="module")
def straight(backends):
    """Each framework's uninterrupted run: (session after STEPS steps, trajectory)."""
    out = {}
    for name, backend in backends.items():
        session = _session(backend, POLICY, canonical_weights(SPEC, seed=3))
        out[name] = (session, _steps(session, 0, STEPS))
    return out


def test_the_frameworks_agree_without_a_checkpoint(straight):
    assert straight["torch"][1] == straight["jax"][1]
    assert [t[2] for t in straight["torch"][1]] == [i in OVERFLOWS for i in range(STEPS)]
    assert len({t[0] for t in straight["torch"][1]}) > 2  # grew and backed off


@pytest.mark.parametrize("first, second", [("torch", "jax"), ("jax", "torch")])
def test_resume_in_the_other_framework(backends, straight, first, second, tmp_path):
    policy = POLICY
    weights = canonical_weights(SPEC, seed=3)
    straight, expected = straight[second]

    before = _session(backends[first], policy, weights)
    trajectory = _steps(before, 0, SPLIT)
    path = tmp_path / "precision.safetensors"
    checkpoint.save_state(path, _state(before))
    after = _session(backends[second], policy, before.params())  # model weights: the user's own format
    _load(after, checkpoint.load_state(path))
    trajectory += _steps(after, SPLIT, STEPS)

    assert [t[2] for t in trajectory] == [i in OVERFLOWS for i in range(STEPS)]
    assert trajectory == expected  # scale (float32 bits), counter, skipped: all ten steps
    for name, value in straight.params().items():
        np.testing.assert_allclose(after.params()[name], value, rtol=2e-3, atol=2e-4, err_msg=name)


def test_jax_refuses_another_policys_loss_scale(backends, tmp_path):
    weights = canonical_weights(SPEC, seed=3)
    torch_run = _session(backends["torch"], Policy.parse("16-mixed"), weights)
    _steps(torch_run, 0, 3)
    checkpoint.save_state(tmp_path / "p.safetensors", _state(torch_run))
    state = checkpoint.load_state(tmp_path / "p.safetensors")
    bf16 = _session(backends["jax"], Policy.parse("bf16-mixed"), weights)
    with pytest.raises(CheckpointError, match='written under policy "16-mixed"'):
        bf16.prec.load_state_dict(state, bf16.opt_state)
    # asked for: only what both policies share, and bf16-mixed has no loss scale to take
    taken, _ = bf16.prec.load_state_dict(state, bf16.opt_state, strict=False)
    assert float(taken.loss_scale.scale) == 1.0
