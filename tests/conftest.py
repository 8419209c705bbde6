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
