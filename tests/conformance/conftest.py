"""Backends for the suite's own tests: the real dualprec_torch / dualprec_jax Precision, one
pair per test session so the JAX side's compiled functions are reused across tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_backends():
    from conformance.backends.jax_backend import JaxBackend
    from conformance.backends.torch_backend import TorchBackend

    return TorchBackend(), JaxBackend()


@pytest.fixture
def fp32_backends(real_backends):
    """The backends, for tests that run the float32 policy (where a correct pair must agree
    to float32 rounding, so any injected error stands out)."""
    return real_backends
