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
