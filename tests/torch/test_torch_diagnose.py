"""dualprec_torch.diagnose on the seeded fragile model (conformance/zoo/fragile_torch.py):
the seeded modules rank first and the suggested policy, re-run, meets the target."""

import copy

import pytest
import torch

import dualprec_torch
from conformance.zoo.fragile import FRAGILE, SEEDED
from dualprec import Policy
from dualprec.diagnose import error_of, reference_policy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    """torch at one thread for this module (tests/conftest.py)."""


@pytest.fixture(scope="module")
def fragile():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FRAGILE.torch_module()
    x, y = FRAGILE.batch(0)
    return model, (torch.from_numpy(x), torch.from_numpy(y))


def _rerun(model, batch, policy, steps):
    from dualprec_torch.diagnose import runner

    run = runner(model, batch, steps=steps)
    return error_of(run(Policy.parse(policy), False), run(reference_policy(Policy.parse(policy)), False))


@pytest.mark.slow
def test_16_mixed_ranks_the_softmax_and_the_norm_first(fragile):
    model, batch = fragile
    before = copy.deepcopy(model.state_dict())
    rep = dualprec_torch.diagnose(model, batch, "16-mixed", steps=1, target=0.01, gains=False)
    assert set(rep.ranking[:2]) == set(SEEDED["16-mixed"])
    assert rep.error == float("inf") and rep.meets_target
    assert sorted(rep.overrides_added) == ["norm", "scores"]
    assert _rerun(model, batch, rep.suggested, 1) <= 0.01  # verified independently of the search
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert rep.module("scores").fwd_rel_error == float("inf")


@pytest.mark.slow
def test_nf4_ranks_the_outlier_layer_first(fragile):
    pytest.importorskip("bitsandbytes")
    model, batch = fragile
    rep = dualprec_torch.diagnose(model, batch, "nf4", steps=1, target=0.15, gains=False)
    assert rep.ranking[0] == "outlier"
    assert rep.meets_target and "outlier" in rep.overrides_added
    assert not Policy.parse(rep.suggested).quantizes("outlier")
    assert _rerun(model, batch, rep.suggested, 1) <= 0.15
    assert rep.module("head").weight_quant_error == pytest.approx(0.09, abs=0.02)  # NF4's ~9% on a plain layer


def test_fp8_ranks_the_outlier_layer_first(fragile):
    model, batch = fragile
    rep = dualprec_torch.diagnose(model, batch, "bf16-mixed,fp8=current", steps=1, target=0.1, gains=False)
    assert rep.ranking[0] == "outlier"
    assert rep.meets_target and rep.overrides_added[0] == "outlier"
    assert Policy.parse(rep.suggested).for_module("outlier").fp8 is None


def test_bad_input_is_one_clear_error(fragile):
    model, batch = fragile
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dualprec_torch.diagnose(object(), batch, "16-mixed")
    with pytest.raises(ValueError, match="float32"):
        dualprec_torch.diagnose(copy.deepcopy(model).half(), batch, "16-mixed")
    with pytest.raises(ValueError, match="target"):
        dualprec_torch.diagnose(model, batch, "16-mixed", target=-1)
