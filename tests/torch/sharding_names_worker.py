"""Per-rank body of tests/torch/test_torch_sharding_names.py (spawned over gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch_support import leave_spawned_worker


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import sharding_worker as w

    from dualprec.errors import NonFiniteGradientError
    from dualprec_torch import Precision
    from dualprec_torch.sharding import local_tensor, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = w.model_and_data()
        precision = Precision("16-mixed,nonfinite=raise", device="cpu")
        model = shard(model, precision.policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = precision.setup(model, optimizer)
        optimizer.zero_grad()
        with precision.autocast():
            out = precision.convert_output(model(precision.convert_input(x)))
        precision.backward(torch.nn.functional.mse_loss(out.float(), y))
        if rank == 1:  # only rank 1's shard of the third layer's weight: rank 0's shards are all finite
            local_tensor(model[2].weight.grad).view(-1)[0] = float("inf")
        try:
            precision.step(optimizer)
            named = "no error"
        except NonFiniteGradientError as e:
            named = e.parameter
        report = precision.last_step(optimizer)
        torch.save({"named": named, "report": report.nonfinite_parameter, "taken": report.taken},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()
