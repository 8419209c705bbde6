"""FSDP2 under a Policy: 2 processes over gloo on CPU against the unsharded Precision."""


import pytest
import sharding_worker as w
import torch
import torch.multiprocessing as mp
from torch_support import free_port

from dualprec import Policy
from dualprec.errors import PolicyError, UnsupportedPolicyError
from dualprec_torch import Precision
from dualprec_torch.sharding import default_blocks, mixed_precision_policy, shard


def _unsharded(policy):
    model, x, y = w.model_and_data()
    precision = Precision(policy, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = precision.setup(model, optimizer)

    def inject(model):  # the element that lies in rank 1's shard (rows 8..15 of 16)
        if w.poisons(policy):
            model[0].weight.grad[8, 0] = float("inf")

    trace = w.train(precision, model, optimizer, x, y, w.STEPS, inject)
    return trace, {n: p.detach() for n, p in model.named_parameters()}


POLICIES = ["32-true", "32-true,nonfinite=skip", "bf16-mixed", "16-mixed"]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One 2-rank spawn runs every policy (process start-up is most of the cost)."""
    out = tmp_path_factory.mktemp("fsdp")
    for i in range(len(POLICIES)):
        (out / str(i)).mkdir()
    mp.spawn(w.worker, args=(2, free_port(), POLICIES, str(out)), nprocs=2, join=True)
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_fsdp2_two_ranks_match_unsharded(policy, fsdp_runs):
    out = fsdp_runs / str(POLICIES.index(policy))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ref_trace, ref_params = _unsharded(policy)
    # one overflow decision: both ranks skip the poisoned step (only rank 1 saw the inf),
    # and the loss-scale trajectories are identical on both ranks and to the unsharded run
    assert ranks[0]["trace"] == ranks[1]["trace"] == ref_trace
    skipped = [not took for took, _ in ref_trace]
    assert skipped == ([False, True, False, False] if w.poisons(policy) else [False] * 4)
    for name, ref in ref_params.items():
        assert ranks[0]["dtypes"][name] == str(ref.dtype)
        for r in ranks:
            # each rank's half-batch gradient is rounded to the compute dtype before the
            # reduction (unsharded: the full batch's once): a few ULP of that dtype times lr
            tol = {"bfloat16": 2e-3, "float16": 3e-4}.get(Policy.parse(policy).compute_dtype, 1e-6)
            torch.testing.assert_close(r["params"][name], ref, rtol=tol, atol=tol)
    # resumed from torch.distributed.checkpoint after 2 steps: the same run, bit for bit
    for r in ranks:
        assert r["resumed_trace"] == r["trace"]
        for name in ref_params:
            assert torch.equal(r["resumed"][name], r["params"][name]), name


def test_mixed_precision_policy_mapping():
    mp_ = mixed_precision_policy(Policy.parse("bf16-mixed"), root=True)
    assert (mp_.param_dtype, mp_.reduce_dtype, mp_.output_dtype, mp_.cast_forward_inputs) == (
        None, torch.float32, torch.float32, False)
    mp_ = mixed_precision_policy(Policy.parse("bf16-mixed,reduce=bf16"), gather="compute")
    assert (mp_.param_dtype, mp_.reduce_dtype, mp_.output_dtype, mp_.cast_forward_inputs) == (
        torch.bfloat16, torch.bfloat16, None, True)
    assert mixed_precision_policy(Policy.parse("bf16-true")).reduce_dtype == torch.bfloat16


def test_default_blocks():
    model, _, _ = w.model_and_data()
    assert default_blocks(model) == ["0", "2", "4"]
    nested = torch.nn.Module()
    nested.embed = torch.nn.Linear(2, 2)
    nested.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)])
    assert default_blocks(nested) == ["blocks.0", "blocks.2"]


@pytest.mark.parametrize("policy, match", [
    ("bf16-mixed,quant=nf4", "quantization \\+ FSDP2"),
    ("bf16-mixed,fp8=delayed", "fp8=delayed \\+ FSDP2"),
    ("bf16-true,master=true", "master=true \\+ FSDP2"),
    ("bf16-mixed,fp8=mxfp8(engine=te)", r"fp8=mxfp8\(engine=transformer-engine\) \+ FSDP2: .*use engine=native or auto"),
])
def test_refused_combinations_name_themselves(policy, match):
    model, _, _ = w.model_and_data()
    with pytest.raises(UnsupportedPolicyError, match=match):
        shard(model, policy)


def test_without_a_process_group_the_error_says_how():
    model, _, _ = w.model_and_data()
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard(model, "bf16-mixed")


def test_block_pattern_that_matches_nothing():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model, _, _ = w.model_and_data()
        with pytest.raises(PolicyError, match="matches no module"):
            shard(model, "bf16-mixed", blocks=["blocks.*"])
        sharded = shard(w.model_and_data()[0], "bf16-mixed,reduce=bf16,@4=32-true")
        assert sharded[0]._get_fsdp_state()._mp_policy.reduce_dtype == torch.bfloat16
        assert sharded[4]._get_fsdp_state()._mp_policy.reduce_dtype == torch.float32  # the override's
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_rank_that_dies_mid_step_is_named_and_the_checkpoint_survives(tmp_path):
    import torch.distributed.checkpoint as dcp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=w.dying_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 3]
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert "rank 0 of 2" in result["message"] and "no optimizer step was taken" in result["message"]
    # the surviving rank did not step: its shard still holds the checkpointed values
    for name, local in result["local"].items():
        assert torch.equal(local, result["saved"][name][: local.shape[0]]), name
    # and the checkpoint written before the failure loads, with the values it was written with
    model, _, _ = w.model_and_data()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for name, saved in result["saved"].items():
        assert torch.equal(state["model"][name], saved), name
