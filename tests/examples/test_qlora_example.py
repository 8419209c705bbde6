"""The QLoRA examples run as written: both backends learn the task from the same NF4 base and
adapter init, and the Flax script on the torch checkpoint reproduces torch's forward (the
codes bit for bit, the bfloat16 forward within a few bfloat16 roundings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow

pytest.importorskip("bitsandbytes")
pytest.importorskip("safetensors")


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quiet", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_qlora_torch_then_flax_on_its_checkpoint(tmp_path):
    ckpt, torch_losses, flax_losses, cont = (tmp_path / n for n in ("q.safetensors", "t.json", "f.json", "c.json"))
    _run("qlora_torch.py", "--steps", 60, "--save", ckpt, "--losses", torch_losses)
    _run("qlora_flax.py", "--steps", 60, "--losses", flax_losses)
    out = _run("qlora_flax.py", "--from-torch", ckpt, "--steps", 5, "--losses", cont)
    t, f, c = (json.loads(p.read_text()) for p in (torch_losses, flax_losses, cont))
    for record in (t, f):
        assert len(record["losses"]) == 60 and record["losses"][-1] < 0.25 * record["losses"][0], record
    assert abs(t["losses"][0] - f["losses"][0]) < 0.01 * t["losses"][0]  # same base bits, adapter, batch
    assert c["same_codes"], out  # torch's NF4 bytes are the ones JAX quantizes itself
    assert c["relative_gap"] < 0.03, out  # bf16 forward: a few roundings of ~1 output
    assert c["losses"][0] < 0.5 * t["losses"][0], c  # it continues from the trained adapter
