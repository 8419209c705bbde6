"""Stand-in Precision objects for the float32 policy only (where a policy changes nothing),
so the harness itself can be tested without depending on the backends' progress, plus a
deliberately broken backend for the localisation tests."""

from __future__ import annotations

import contextlib

import pytest

from dualprec import Policy


def _require_fp32(policy):
    p = policy if isinstance(policy, Policy) else Policy.parse(policy)
    if p != Policy.parse("32-true"):
        raise NotImplementedError("the test stand-in runs 32-true only")


class Fp32TorchPrecision:
    def __init__(self, policy):
        _require_fp32(policy)

    def init_module(self):
        return contextlib.nullcontext()

    def setup(self, model, *opts):
        return (model, *opts)

    def autocast(self):
        return contextlib.nullcontext()

    def convert_input(self, x):
        return x

    def convert_output(self, x):
        return x

    def backward(self, loss):
        loss.backward()

    def unscale_(self, opt):
        pass

    def step(self, opt):
        opt.step()
        return True

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Fp32JaxPrecision:
    def __init__(self, policy):
        _require_fp32(policy)

    def module(self, m):
        return m

    def cast_to_param(self, tree):
        return tree

    def convert_input(self, x):
        return x

    def convert_output(self, x):
        return x

    def optimizer(self, tx):
        return tx

    def scale_loss(self, loss, state):
        return loss

    def unscale(self, grads, state):
        return grads

    def loss_scale_state(self, state):
        return {"scale": 1.0, "counter": 0, "last_finite": True}


@pytest.fixture
def fp32_backends():
    from conformance.backends.jax_backend import JaxBackend
    from conformance.backends.torch_backend import TorchBackend

    return TorchBackend(Fp32TorchPrecision), JaxBackend(Fp32JaxPrecision)
