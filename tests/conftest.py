"""Suite-wide isolation: a 64-bit policy turns `jax_enable_x64` on for the whole process
(dualprec_jax says so with a warning); each test module gets the setting it started with
back, so one module's float64 policy cannot change another module's dtypes."""

import sys

import pytest


@pytest.fixture(autouse=True, scope="module")
def _restore_jax_x64():
    jax = sys.modules.get("jax")
    before = jax.config.read("jax_enable_x64") if jax is not None else False
    yield
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.read("jax_enable_x64") != before:
        jax.config.update("jax_enable_x64", before)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny ops: torch's intra-op pool only adds synchronisation (under load, 10x slower).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
