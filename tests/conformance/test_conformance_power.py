"""Power of compare() on users' models not in the zoo (gpt_pair.py, cnn_pair.py): each planted
twin bug under 32-true, bf16-mixed and 16-mixed (power_table.py prints the table of
docs/conformance.md "Power on users' models"), and the un-planted pairs under every policy,
also with torch summing in another order (DUALPREC_CONFORMANCE_REORDER=7)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from power_table import NO_BUG, PAIRS, POLICIES, run_cell, run_pair

#: (model, bug) -> policy -> (a check that must fail, the layers it may point at); None: no bug
#: under that policy (power_table.NO_BUG says why), the pair must pass.  The first failing
#: check of each cell, and its margin, are in the docs table.
CAUGHT = {
    # float32 everywhere: fc1's GELU moves ~1e4 float32 ULP; under half policies the MLP
    # block's bfloat16/float16 output shows it by its share of flipped elements
    ("gpt", "gelu-tanh"): {"32-true": ("layers", {"blocks.0.mlp", "blocks.0.mlp.fc2"}),
                           "bf16-mixed": ("layers", {"blocks.0.mlp"}), "16-mixed": ("layers", {"blocks.0.mlp"})},
    # LayerNorm outputs float32 under every one of these policies
    ("gpt", "ln-eps"): {p: ("layers", {"blocks.0.ln1"}) for p in POLICIES},
    ("gpt", "softmax-half"): {"32-true": None, "bf16-mixed": ("layers", {"blocks.0.attn"}),
                              "16-mixed": ("layers", {"blocks.0.attn"})},
    ("gpt", "accum-half"): {"32-true": None, "bf16-mixed": ("layers", {"blocks.0.mlp.fc1"}),
                            "16-mixed": ("layers", {"blocks.0.mlp.fc1"})},
    ("gpt", "attn-scale"): {p: ("layers", {"blocks.0.attn"}) for p in POLICIES},
    ("gpt", "output-uncast"): {"32-true": None, "bf16-mixed": ("dtype-flow", {"output"}),
                               "16-mixed": ("dtype-flow", {"output"})},
    # the stage's output is GELU(GroupNorm) in float32 under the mixed policies: its own ops
    # (children's outputs shared) show the tanh GELU by their median element
    ("cnn", "gelu-tanh"): {"32-true": ("layers", {"s1"}), "bf16-mixed": ("layers", {"s1 (own ops)"}),
                           "16-mixed": ("layers", {"s1 (own ops)"})},
    ("cnn", "gn-eps"): {p: ("layers", {"s1.norm"}) for p in POLICIES},
    ("cnn", "accum-half"): {"32-true": None, "bf16-mixed": ("layers", {"head.fc"}),
                            "16-mixed": ("layers", {"head.fc"})},
    ("cnn", "padding"): {p: ("layers", {"s2.conv"}) for p in POLICIES},
    ("cnn", "output-uncast"): {"32-true": None, "bf16-mixed": ("dtype-flow", {"output"}),
                               "16-mixed": ("dtype-flow", {"output"})},
}


def test_every_planted_bug_has_a_row():
    assert {(m, b) for m in PAIRS for b in PAIRS[m].bugs} == set(CAUGHT)
    assert {k for k, row in CAUGHT.items() for p, want in row.items() if want is None} == \
        {(m, b) for m, b, p in NO_BUG}


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model,bug", sorted(CAUGHT))
def test_planted_twin_bug_is_caught(real_backends, model, bug, policy):
    cell = run_cell(model, bug, policy, backends=real_backends)  # forward bugs: no targets needed
    assert not cell.errors, cell.errors
    want = CAUGHT[model, bug][policy]
    if want is None:  # no bug under this policy: the pair must pass
        assert cell.ok, cell.text()
        return
    check, where = want
    assert not cell.ok and cell.first is not None
    assert cell.margin is None or cell.margin > 1.0, cell.text()
    hits = [w for c, w in cell.failing if c == check]
    assert hits and hits[0] in where, cell.text()


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model", sorted(PAIRS))
def test_the_correct_pair_passes_every_check(real_backends, model, policy):
    """No false alarm: the un-planted twins, with targets and one SGD step (gradients, loss,
    update and training checks included)."""
    r = run_pair(model, "", policy, backends=real_backends, targets=True, steps=1)
    assert r.ok and not [x for x in r.records if x.status in ("error", "skip")], r.explain()
    assert {x.check for x in r.records} >= {"layers", "forward", "gradients", "loss", "train-params", "update"}


REORDERED = """
import sys
sys.path.insert(0, {here!r})
from power_table import run_pair
from conformance import kernels
for model in ("gpt", "cnn"):
    for policy in ("32-true", "bf16-mixed", "16-mixed"):
        # forward checks everywhere (the tight, layer-isolated bounds); gradients, loss scaling
        # and a step once (their bounds are the chained ones)
        full = (model, policy) == ("gpt", "16-mixed")
        r = run_pair(model, "", policy, targets=full, steps=int(full))
        print("clean", model, policy, r.ok)
        if not r.ok:
            print(r.explain())
for model, bug in (("gpt", "gelu-tanh"), ("cnn", "gelu-tanh")):
    r = run_pair(model, bug, "bf16-mixed")
    print("bug", model, bug, r.ok, [x.where for x in r.records if x.check == "layers"][0])
print(r.explain())
print("installed", kernels._installed)
"""


@pytest.mark.slow
def test_compare_under_the_torch_reordering_mode():
    """DUALPREC_CONFORMANCE_REORDER=7: torch sums every linear/matmul/conv in chunks of 7, last
    chunk first; the clean pairs still pass under every policy (the GPT under 16-mixed with
    gradients and a step too), the planted GELUs are caught."""
    here = str(Path(__file__).parent)
    env = {**os.environ, "DUALPREC_CONFORMANCE_REORDER": "7"}
    out = subprocess.run([sys.executable, "-c", REORDERED.format(here=here)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    clean = [ln for ln in lines if ln.startswith("clean ")]
    assert len(clean) == 6 and all(ln.endswith(" True") for ln in clean), out.stdout
    assert "bug gpt gelu-tanh False blocks.0.mlp" in lines, out.stdout
    assert "bug cnn gelu-tanh False s1 (own ops)" in lines, out.stdout
    assert "torch side in the reordering mode (DUALPREC_CONFORMANCE_REORDER=7)" in out.stdout.replace("\n    ", " ")
    assert lines[-1] == "installed True"
