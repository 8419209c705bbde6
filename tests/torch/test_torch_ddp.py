"""One skip decision under DDP: an inf in one rank's gradient after DDP's all-reduce skips
the step on every rank (torch DistributedDataParallel and Fabric's ddp strategy), 2 gloo
ranks on CPU.  See tests/torch/ddp_worker.py for what each rank runs."""


import ddp_worker as w
import pytest
import torch
import torch.multiprocessing as mp
from torch_support import free_port

from dualprec_torch import Precision
from dualprec_torch.sharding import decision_group

pytest.importorskip("lightning", reason="lightning is a test extra: pip install lightning")

SKIPPED_AT_INJECT = [True, False, True, True]  # took the step? the second step had an inf on rank 1




@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One 2-rank spawn runs every scenario (process start-up is most of the cost)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(w.worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["16-mixed", "32-true,nonfinite=skip"])
def test_ddp_ranks_take_one_decision(policy, ddp_runs):
    r0, r1 = (r[policy] for r in ddp_runs)
    # rank 0's gradients were finite, yet it skipped the step rank 1 had to skip
    assert [t for t, _ in r0["trace"]] == [t for t, _ in r1["trace"]] == SKIPPED_AT_INJECT
    assert r0["trace"] == r1["trace"]  # the same loss-scale update on both ranks
    if policy == "16-mixed":
        assert [s for _, s in r0["trace"]] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    assert _same_weights(r0["weights"], r1["weights"])
    assert r0["named"] == r1["named"] == "module.0.weight"  # rank 0 names the parameter too


@pytest.mark.multiprocess
@pytest.mark.slow
def test_process_group_none_lets_each_rank_decide_alone(ddp_runs):
    """What the all-reduce prevents: without it the ranks' weights and scales part ways."""
    r0, r1 = (r["alone"] for r in ddp_runs)
    assert [t for t, _ in r0["trace"]] == [True] * 4 and [t for t, _ in r1["trace"]] == SKIPPED_AT_INJECT
    assert r0["trace"][1][1] == 2.0**16 and r1["trace"][1][1] == 2.0**15
    assert not _same_weights(r0["weights"], r1["weights"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fabric_ddp_takes_one_decision_and_resumes(ddp_runs):
    r0, r1 = (r["fabric"] for r in ddp_runs)
    assert r0["trace"] == r1["trace"]
    assert [t for t, _ in r0["trace"]] == SKIPPED_AT_INJECT
    assert [s for _, s in r0["trace"]] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]
    assert _same_weights(r0["weights"], r1["weights"])
    # saved after 2 steps (fabric.save, the plugin in the state) and resumed: the same run, bit for bit
    for r in (r0, r1):
        assert r["resumed_trace"] == r["trace"]
        assert _same_weights(r["resumed"], r["weights"])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fabric_own_mixed_precision_plugin_decides_per_rank(ddp_runs):
    """Fabric's MixedPrecision (torch.amp.GradScaler) does not all-reduce: the difference
    docs/fabric.md states."""
    r0, r1 = (r["fabric-own"] for r in ddp_runs)
    assert [t for t, _ in r0["trace"]] == [True] * 4 and [t for t, _ in r1["trace"]] == SKIPPED_AT_INJECT
    assert r0["trace"][1][1] == 2.0**16 and r1["trace"][1][1] == 2.0**15
    assert not _same_weights(r0["weights"], r1["weights"])


def test_without_a_process_group_each_precision_decides_alone():
    assert decision_group(None, None, "auto") is None
    assert decision_group("fsdp-group", None, None) == "fsdp-group"  # FSDP2 shards always agree


def test_single_rank_group_needs_no_all_reduce():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert decision_group(None, None, "auto") is None  # one rank: nothing to agree on
        assert decision_group(None, None, dist.group.WORLD) is dist.group.WORLD  # as given
        Precision("16-mixed", device="cpu", process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", ["world", 0, object()])
def test_process_group_argument_is_checked(bad):
    with pytest.raises(ValueError, match=r'process_group=\.\.\.\): .* is not a process group; use "auto"'):
        Precision("16-mixed", device="cpu", process_group=bad)
