"""Block-scaled recipes under sharded jit: 4 host devices in a process of their own
(blockscale_sharding_script.py); codes and scales equal the unsharded run's bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("blockscale_sharding_script.py")
RECIPES = ["rowwise", "rowwise_with_gw_hp", "mxfp8", "mxfp8-floor", "nvfp4", "nvfp4-1x16"]
CHECKS = [f"{r} {what}" for r in RECIPES for what in ("codes-and-scales", "outputs")] + \
    [f"{r} layer-grad" for r in ("rowwise", "mxfp8", "nvfp4")]


@pytest.fixture(scope="module")
def script_output():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parents[2])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("check", CHECKS)
def test_sharded_block_recipe(check, script_output):
    lines = [ln.split(" (")[0] for ln in script_output.stdout.splitlines()]
    assert f"OK {check}" in lines, script_output.stdout + script_output.stderr[-4000:]
