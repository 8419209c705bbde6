"""Mutation testing in CI: a fast subset of the known precision bugs must be caught, and the
unmutated run over the same subset must be green."""

import pytest

from conformance import mutants


def test_mutant_list_is_complete_and_named_once():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names)) >= 12
    assert {m.backend for m in mutants.MUTANTS} == {"jax", "torch", "twin"}
    assert set(mutants.CI_SUBSET) <= set(names)


def test_patches_are_undone():
    import dualprec_jax
    from dualprec_jax import ops, optim

    before = (optim._select, optim.loss_scale_update, ops.OpDtypes.__init__, dualprec_jax.Precision.convert_output)
    for m in mutants.MUTANTS:
        with m.patch():
            pass
    assert before == (optim._select, optim.loss_scale_update, ops.OpDtypes.__init__,
                      dualprec_jax.Precision.convert_output)


@pytest.mark.slow
def test_fast_subset_is_killed_and_clean_run_is_green():
    chosen = [m for m in mutants.MUTANTS if m.name in mutants.CI_SUBSET]
    clean = mutants.clean_run(chosen, steps=3, policies=tuple(mutants.CI_SUBSET.values()), models=("mlp",))
    assert clean and not [f"{r.policy}/{r.model}/{r.check}: {r.reason}" for r in clean if r.failed]
    for m in chosen:
        outcome = mutants.run_mutant(m, steps=3, policies=(mutants.CI_SUBSET[m.name],), models=("mlp",))
        assert outcome.killed, f"{m.name} survived"


# ---------------------------------------------------------------- FP8 / block-scaled recipe mutants
BLOCK_CODE_MUTANTS = {"mx-scale-floor": "bf16-mixed+mxfp8", "torch-mx-block-axis": "bf16-mixed+mxfp8",
                      "torch-sr-wrong-stream": "bf16-mixed+nvfp4", "nvfp4-single-level": "bf16-mixed+nvfp4"}


def _block_ctx(label):
    from conformance import matrix
    from conformance.backends import default_backends
    from conformance.checks import Context
    from conformance.weights import WeightMap
    from conformance.zoo import canonical_weights, get

    spec = get("mlp")
    w = canonical_weights(spec, 0)
    a, b = default_backends()
    return Context(a, b, spec, matrix.combination(label), label, w,
                   WeightMap.auto({k: v.shape for k, v in w.items()}))


def test_block_recipe_mutants_are_listed_with_their_recipe_cells():
    from conformance import matrix

    by_name = {m.name: m for m in mutants.MUTANTS}
    for name, label in {**BLOCK_CODE_MUTANTS, "delayed-scale-late": "bf16-mixed+fp8"}.items():
        assert by_name[name].policies == (label,)
        assert label in matrix.default_policies()
    assert set(matrix.FULL_ONLY) <= set(matrix.default_policies())


@pytest.mark.parametrize("name", [  # the JAX mutants retrace (and recompile) the block GEMMs: 15-30 s
    pytest.param(n, marks=pytest.mark.slow) if not n.startswith("torch-") else n for n in sorted(BLOCK_CODE_MUTANTS)])
def test_block_codes_check_kills_block_mutant(name):
    """The block-codes record of the mutant's recipe cell passes unmutated and fails mutated."""
    from conformance.checks import check_block_codes

    ctx = _block_ctx(BLOCK_CODE_MUTANTS[name])
    [clean] = check_block_codes(ctx)
    assert clean.status == "pass", clean.reason
    assert clean.detail["layers"] >= 2 and clean.detail["tensors"] >= 20
    m = next(m for m in mutants.MUTANTS if m.name == name)
    with m.patch():
        [rec] = check_block_codes(ctx)
    assert rec.status == "fail" and rec.check == "block-codes", rec.reason
    [again] = check_block_codes(ctx)  # the patch (and its traces) are undone
    assert again.status == "pass", again.reason


@pytest.mark.slow
def test_delayed_scale_late_is_killed_by_fp8_scales():
    m = next(m for m in mutants.MUTANTS if m.name == "delayed-scale-late")
    outcome = mutants.run_mutant(m, steps=3)
    assert outcome.killed and any(b.startswith("bf16-mixed+fp8/mlp/fp8-scales") for b in outcome.by), outcome.by
