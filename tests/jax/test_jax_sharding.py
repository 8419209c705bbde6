"""Sharded JAX under a Policy: 4 host devices in a process of their own (sharding_script.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharding_script.py")
CHECKS = ["sharded_jit_matches_unsharded", "one_loss_scale_decision", "reduce_dtype_in_shard_map", "bad_input"]


@pytest.fixture(scope="module")
def script_output():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parents[2])
    return proc


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("check", CHECKS)
def test_sharded_jax(check, script_output):
    assert f"OK {check}" in script_output.stdout.splitlines(), script_output.stdout + script_output.stderr[-4000:]
