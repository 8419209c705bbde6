"""The spec layer imports no backend: parsing, serializing, explaining, capability checks,
registry queries and precision checkpoints leave torch, JAX and both backend packages out of
``sys.modules``; explain then says, per backend, which package to import."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BACKEND_MODULES = ("torch", "jax", "jaxlib", "flax", "dualprec_torch", "dualprec_jax")

SPEC_ONLY = """
import json, sys, tempfile, os
import numpy as np
import dualprec
from dualprec import DeviceCaps, Policy, checkpoint, explain, registry, serialize

p = Policy.parse("16-mixed,quant=nf4(skip=lm_head),@head=32-true")
assert Policy.from_dict(p.to_dict()) == p and Policy.from_json(p.to_json()) == p
assert serialize.policy_from_json(serialize.policy_to_json(p)) == p
info = explain(p)
report = p.check(DeviceCaps("cuda", "H100", (9, 0), backend="torch", bitsandbytes=True))
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "state.safetensors")
    checkpoint.save_state(path, checkpoint.new_state(p, 1024.0, 3, {"w": np.ones(3, np.float32)}))
    back = checkpoint.load_state(path)
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in %(backends)r),
    "loaded": [registry.loaded(b) for b in registry.BACKENDS],
    "registered": registry.registered("torch", "mechanism"),
    "describe": registry.describe("jax", "mechanism", p),
    "refusal": registry.refusal("torch", p),
    "explain_torch": sorted(set(info["backends"]["torch"].values())),
    "scale": back["loss_scale"]["scale"],
}))
""" % {"backends": BACKEND_MODULES}


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_spec_layer_imports_no_backend_and_explain_names_the_package_to_import():
    got = _run(SPEC_ONLY)
    assert got["modules"] == []
    assert got["loaded"] == [False, False]
    assert got["registered"] is False and got["refusal"] is None
    assert got["describe"].startswith("dualprec_jax is not imported in this process: import dualprec_jax")
    (line,) = got["explain_torch"]  # every torch line says the same: which package to import
    assert line.startswith("dualprec_torch is not imported in this process: import dualprec_torch")
    assert got["scale"] == 1024.0


def test_importing_a_backend_registers_it_and_only_it():
    code = SPEC_ONLY.replace("import dualprec\n", "import dualprec\nimport dualprec_torch\n")
    got = _run(code)
    assert "dualprec_torch" in got["modules"] and "dualprec_jax" not in got["modules"]
    assert got["loaded"] == [True, False] and got["registered"] is True
    assert not any("not imported" in line for line in got["explain_torch"])
