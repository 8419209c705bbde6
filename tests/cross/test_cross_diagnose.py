"""`diagnose` in both backends on the seeded fragile model (the same weights, moved with
conformance.weights): each ranks the seeded modules first, the suggested policies are the
same string, and each re-runs under its target in both backends."""

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

from conformance.zoo.fragile import SEEDED  # noqa: E402
from dualprec import Policy  # noqa: E402
from dualprec.diagnose import error_of, reference_policy  # noqa: E402
from dualprec.diagnose_cli import agreement, load_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

STEPS = 1
@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    """torch at one thread for this module (tests/conftest.py)."""


CASES = {"16-mixed": ("16-mixed", 0.01), "fp8": ("bf16-mixed,fp8=current", 0.1)}


def _diagnose(backend, policy, target):
    got = load_model("fragile", backend, 0, STEPS)
    if backend == "torch":
        import dualprec_torch

        return got, dualprec_torch.diagnose(got["model"], got["batch"], policy, loss_fn=got["loss_fn"],
                                            steps=STEPS, target=target, gains=False)
    import dualprec_jax

    return got, dualprec_jax.diagnose(got["model"], got["variables"], got["batch"], policy, steps=STEPS,
                                      target=target, gains=False)


def _rerun(backend, got, policy):
    if backend == "torch":
        from dualprec_torch.diagnose import runner

        run = runner(got["model"], got["batch"], loss_fn=got["loss_fn"], steps=STEPS)
    else:
        from dualprec_jax.diagnose import runner

        run = runner(got["model"], got["variables"], got["batch"], steps=STEPS)
    p = Policy.parse(policy)
    return error_of(run(p, False), run(reference_policy(p), False))


@pytest.fixture(scope="module", params=sorted(CASES))
def both(request):
    policy, target = CASES[request.param]
    return request.param, target, {b: _diagnose(b, policy, target) for b in ("torch", "jax")}


def test_both_backends_rank_the_seeded_modules_first_and_agree(both):
    kind, target, runs = both
    seeded = SEEDED[kind]
    reports = [rep for _, rep in runs.values()]
    k = 2 if kind == "16-mixed" else 1
    for rep in reports:
        assert set(rep.ranking[:k]) == set(seeded[:k]), (rep.backend, rep.ranking)
        assert rep.meets_target, (rep.backend, rep.suggested, rep.suggested_error)
    a = agreement(reports, k=k)
    assert a["same_top"]
    assert reports[0].suggested == reports[1].suggested


def test_the_suggested_policy_meets_the_target_in_the_other_backend_too(both):
    kind, target, runs = both
    (got_t, rep_t), (got_j, rep_j) = runs["torch"], runs["jax"]
    assert _rerun("jax", got_j, rep_t.suggested) <= target
    assert _rerun("torch", got_t, rep_j.suggested) <= target
