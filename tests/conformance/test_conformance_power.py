"""Power of compare() on a user-style model (tests/conformance/gpt_pair.py, not in the zoo)
under each policy: three twin bugs planted in the Flax GPT, and which check catches each.

Measured (CPU, batch 8; docs/conformance.md "Power on a user's GPT"): every bug is caught by
the layer-isolated check under 32-true, bf16-mixed and 16-mixed, except the bf16 softmax
under 32-true, where it is no bug (the scores are float32 there, so ``jax.nn.softmax`` is
the float32 softmax torch computes) and the pair correctly passes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance import compare

from gpt_pair import FlaxGPT, TorchGPT, data

POLICIES = ("32-true", "bf16-mixed", "16-mixed")

#: bug -> policy -> the layers the layer-isolated check may name first (None: the pair passes)
CAUGHT = {
    "": {p: None for p in POLICIES},
    # float32 everywhere: the GELU's output moves ~1e4 float32 ULP at fc1's output, so its
    # block (and fc2, which consumes it) fail; under half policies fc1 -> GELU -> fc2 rounds to
    # bf16/fp16 and only the block's share of flipped elements shows it (25-50% vs <2%)
    "gelu-tanh": {"32-true": {"blocks.0.mlp", "blocks.0.mlp.fc2"},
                  "bf16-mixed": {"blocks.0.mlp"}, "16-mixed": {"blocks.0.mlp"}},
    # LayerNorm outputs float32 under every one of these policies: ~90 ULP vs the bound 54
    "ln-eps": {p: {"blocks.0.ln1"} for p in POLICIES},
    "softmax-half": {"32-true": None, "bf16-mixed": {"blocks.0.attn"}, "16-mixed": {"blocks.0.attn"}},
}


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bug", list(CAUGHT))
def test_planted_twin_bug_is_caught(real_backends, bug, policy):
    torch.manual_seed(0)
    ids, y = data()
    result = compare(TorchGPT(), FlaxGPT(bug=bug), None, policy, ids, backends=real_backends)  # forward bugs: no targets needed
    want = CAUGHT[bug][policy]
    if want is None:
        assert result.ok, result.explain()
        return
    assert not result.ok
    layers = next(r for r in result.records if r.check == "layers")
    assert layers.status == "fail" and layers.where in want, result.explain()
    assert not [r for r in result.records if r.status == "error"], result.explain()


REORDERED = """
import sys, torch
sys.path.insert(0, {here!r})
from gpt_pair import FlaxGPT, TorchGPT, data
from conformance import compare, kernels
ids, y = data()
for bug in ("", "gelu-tanh"):
    torch.manual_seed(0)
    r = compare(TorchGPT(), FlaxGPT(bug=bug), None, "bf16-mixed", ids)
    print(bug or "clean", r.ok, next(x.where for x in r.records if x.check == "layers"))
    print(r.explain())
print("installed", kernels._installed)
"""


@pytest.mark.slow
def test_compare_under_the_torch_reordering_mode():
    """DUALPREC_CONFORMANCE_REORDER=7: torch sums every linear/matmul in chunks of 7, last
    chunk first; the clean pair still passes, the planted GELU is still caught."""
    here = str(Path(__file__).parent)
    env = {**__import__("os").environ, "DUALPREC_CONFORMANCE_REORDER": "7"}
    out = subprocess.run([sys.executable, "-c", REORDERED.format(here=here)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "clean True" in lines[0], out.stdout
    assert any(ln.startswith("gelu-tanh False blocks.0.mlp") for ln in lines), out.stdout
    assert "torch side in the reordering mode (DUALPREC_CONFORMANCE_REORDER=7)" in out.stdout.replace("\n    ", " ")
    assert lines[-1] == "installed True"
