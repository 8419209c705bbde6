"""The per-rank body of the FSDP2 tests (tests/torch/test_torch_sharding.py): run by
torch.multiprocessing.spawn over gloo on CPU; each rank writes its results to a file."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch_support import leave_spawned_worker

STEPS = 4
INJECT_STEP = 1  # the step whose scaled gradient gets an inf, on rank 1's shard only


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def train(precision, model, optimizer, x, y, steps, inject, start=0):
    """``inject(model)`` poisons a gradient after backward at INJECT_STEP; returns per-step
    (took_step, scale)."""
    trace = []
    for step in range(start, start + steps):
        optimizer.zero_grad()
        with precision.autocast():
            out = precision.convert_output(model(precision.convert_input(x)))
        loss = nn.functional.mse_loss(out.float(), y)
        precision.backward(loss)
        if step == INJECT_STEP and inject is not None:
            inject(model)
        took = precision.step(optimizer)
        precision.update()
        trace.append((bool(took), precision.scale))
    return trace


def _sharded_run(policy, x, y, steps, inject, state=None, start=0):
    from dualprec_torch import Precision
    from dualprec_torch.sharding import shard

    model, _, _ = model_and_data()
    precision = Precision(policy, device="cpu")
    model = shard(model, precision.policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = precision.setup(model, optimizer)
    if state is not None:
        state(model, optimizer, precision)
    trace = train(precision, model, optimizer, x, y, steps, inject, start)
    return model, optimizer, precision, trace


def poisons(policy) -> bool:
    """Whether the run injects an overflow: only where a non-finite step is skipped (with
    torch's default rule a NaN step is applied, unsharded and sharded alike)."""
    from dualprec import Policy

    return Policy.parse(policy).nonfinite_rule == "skip"


def worker(rank: int, world: int, port: int, policies: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, policy in enumerate(policies):
            run_policy(rank, world, policy, os.path.join(out_dir, str(i)))
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()


def run_policy(rank: int, world: int, policy: str, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from dualprec_torch.sharding import local_tensor

    _, x, y = model_and_data()
    rows = len(x) // world
    x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]

    def inject(model):
        if rank == 1 and poisons(policy):  # rank 1's own shard of the first weight: rank 0 sees nothing
            local_tensor(model[0].weight.grad).view(-1)[0] = float("inf")

    model, optimizer, precision, trace = _sharded_run(policy, x, y, STEPS, inject)
    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}

    # the same run, checkpointed after 2 steps through torch.distributed.checkpoint
    model_a, opt_a, prec_a, trace_a = _sharded_run(policy, x, y, 2, inject)
    ckpt = os.path.join(out_dir, "dcp")  # one directory per policy
    dcp.save({"model": get_model_state_dict(model_a), "optim": get_optimizer_state_dict(model_a, opt_a),
              "precision": prec_a.state_dict()}, checkpoint_id=ckpt)

    def restore(model_b, opt_b, prec_b):
        state = {"model": get_model_state_dict(model_b), "optim": get_optimizer_state_dict(model_b, opt_b),
                 "precision": prec_b.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(model_b, state["model"])
        set_optimizer_state_dict(model_b, opt_b, state["optim"])
        prec_b.load_state_dict(state["precision"])

    model_b, _, _, trace_b = _sharded_run(policy, x, y, STEPS - 2, inject, state=restore, start=2)
    resumed = {n: p.full_tensor().detach() for n, p in model_b.named_parameters()}
    dtypes = {n: str(p.dtype) for n, p in model.named_parameters()}
    torch.save({"trace": trace, "params": full, "resumed_trace": trace_a + trace_b, "resumed": resumed,
                "dtypes": dtypes}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":  # pragma: no cover - manual runs
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])


def dying_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Checkpoint after one step; at the second, rank 1 dies after backward.  Rank 0 records
    the error it gets and the parameters it holds."""
    import datetime

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from dualprec_torch import Precision
    from dualprec_torch.sharding import shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    model, x, y = model_and_data()
    precision = Precision("16-mixed", device="cpu")
    model = shard(model, precision.policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = precision.setup(model, optimizer)
    train(precision, model, optimizer, x, y, 1, None)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=os.path.join(out_dir, "dcp"))
    saved = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    with precision.autocast():
        loss = nn.functional.mse_loss(model(x).float(), y)
    precision.backward(loss)
    if rank == 1:
        os._exit(3)
    try:
        precision.step(optimizer)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    torch.save({"message": message, "saved": saved, "local": local}, os.path.join(out_dir, "rank0.pt"))
    os._exit(0)  # the group cannot be torn down cleanly without its peer
