"""The per-rank body of tests/torch/test_torch_ddp.py: DistributedDataParallel and Fabric's
``ddp`` strategy over gloo on CPU, 2 ranks spawned by torch.multiprocessing.  At INJECT_STEP
rank 1 alone gets an inf in its local gradient after DDP's all-reduce (what a per-rank hook,
a clip or a parameter DDP does not reduce leaves behind); each rank writes what it did."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch_support import leave_spawned_worker

STEPS = 4
INJECT_STEP = 1
SAVE_AFTER = 2  # the Fabric run is saved after this many steps and resumed in a fresh Fabric


def model_and_data(rank: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
    return model, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]  # each rank its own half


def _inject(rank: int, raw: nn.Module, step: int) -> None:
    if step == INJECT_STEP and rank == 1:  # after backward: DDP's all-reduce is over
        raw[0].weight.grad[3, 2] = float("inf")


def _weights(raw: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in raw.named_parameters()}


def torch_ddp(rank: int, policy: str, process_group="auto") -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from dualprec_torch import Precision

    raw, x, y = model_and_data(rank)
    precision = Precision(policy, device="cpu", process_group=process_group)
    model = DistributedDataParallel(raw)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = precision.setup(model, optimizer)
    trace, named = [], None
    for step in range(STEPS):
        optimizer.zero_grad()
        with precision.autocast():
            out = precision.convert_output(model(precision.convert_input(x)))
        precision.backward(nn.functional.mse_loss(out.float(), y))
        _inject(rank, raw, step)
        took = precision.step(optimizer)
        precision.update()
        if step == INJECT_STEP:
            named = precision.last_step(optimizer).nonfinite_parameter
        trace.append((bool(took), precision.scale))
    return {"trace": trace, "weights": _weights(raw), "named": named}


def _fabric(plugin):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", plugins=[plugin])
    fabric.launch()  # LOCAL_RANK is set: the processes exist, the process group too
    return fabric


def _fabric_steps(fabric, raw, model, optimizer, x, y, steps, scale) -> list:
    trace = []
    for step in steps:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        fabric.backward(loss)
        _inject(fabric.global_rank, raw, step)
        before = raw[0].weight.detach().clone()
        optimizer.step()
        trace.append((not torch.equal(before, raw[0].weight), scale()))  # (stepped, loss scale)
    return trace


def fabric_dualprec(rank: int, out_dir: str) -> dict:
    from dualprec_torch.fabric import DualprecPrecision

    def run(steps, load=None):
        plugin = DualprecPrecision("16-mixed", device="cpu")
        fabric = _fabric(plugin)
        raw, x, y = model_and_data(rank)
        model, optimizer = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.1))
        state = {"model": model, "optimizer": optimizer, "precision": plugin}
        if load:
            fabric.load(load, state)
        trace = _fabric_steps(fabric, raw, model, optimizer, x, y, steps, lambda: plugin.scale)
        return fabric, state, raw, trace

    _, _, raw, trace = run(range(STEPS))
    fabric, state, _, first = run(range(SAVE_AFTER))
    path = os.path.join(out_dir, "fabric.ckpt")
    fabric.save(path, state)
    _, _, resumed, rest = run(range(SAVE_AFTER, STEPS), load=path)
    return {"trace": trace, "weights": _weights(raw), "resumed_trace": first + rest, "resumed": _weights(resumed)}


def fabric_own(rank: int) -> dict:
    """Fabric's own 16-mixed plugin (torch.amp.GradScaler): each rank decides alone."""
    from lightning.fabric.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", device="cpu")
    fabric = _fabric(plugin)
    raw, x, y = model_and_data(rank)
    model, optimizer = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.1))
    trace = _fabric_steps(fabric, raw, model, optimizer, x, y, range(STEPS), plugin.scaler.get_scale)
    return {"trace": trace, "weights": _weights(raw)}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), NODE_RANK="0")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Fabric's notes on CPU float16 and on the DDP set-up
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {
            "16-mixed": torch_ddp(rank, "16-mixed"),
            "32-true,nonfinite=skip": torch_ddp(rank, "32-true,nonfinite=skip"),
            "alone": torch_ddp(rank, "16-mixed", process_group=None),
            "fabric": fabric_dualprec(rank, out_dir),
            "fabric-own": fabric_own(rank),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_spawned_worker()
