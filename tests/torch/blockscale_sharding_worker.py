"""The per-rank body of tests/torch/test_torch_blockscale_sharding.py (2 gloo ranks on CPU):
block-scaled recipes with the batch split over data-parallel ranks, against the unsharded run.
Each rank writes "OK <recipe> <what>" lines (or the failure) to a file."""

from __future__ import annotations

import datetime
import os
import traceback

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch_support import leave_spawned_worker

from dualprec import FP8Recipe

RECIPES = {"rowwise": FP8Recipe("rowwise"), "rowwise_with_gw_hp": FP8Recipe("rowwise_with_gw_hp"),
           "mxfp8": FP8Recipe("mxfp8"), "nvfp4": FP8Recipe("nvfp4")}
M, K, N = 64, 48, 24  # 32 rows per rank: the blocks along the batch lie on one rank


def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[45] *= np.float32(50.0)  # the batch amax lies on rank 1
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    g = (rng.standard_normal((M, N)) * 1e-3).astype(np.float32)
    g[3, 5] = np.float32(0.5)  # the gradient's on rank 0
    return torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(g)


def _u8(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def check_parts(name, recipe, rank, world):
    from dualprec_torch import blockscale as bs

    x, w, g = data()
    rows = slice(rank * M // world, (rank + 1) * M // world)
    full = bs.block_linear_parts(x, w, g, recipe, 11, 2)
    local = bs.block_linear_parts(x[rows], w, g[rows], recipe, 11, 2, group=dist.group.WORLD)
    n = 0
    for k, v in full.items():
        if k in ("y", "dx", "dw"):
            continue
        lv = local[k]
        axes = [i for i, (a, b) in enumerate(zip(v.shape, lv.shape)) if a != b]
        if axes:  # an operand along the batch: this rank's share of the global codes/scales
            (ax,) = axes
            v = v.narrow(ax, rank * lv.shape[ax], lv.shape[ax])
        assert torch.equal(_u8(v), _u8(lv)), f"{name} {k}: rank {rank} differs from the unsharded run"
        n += 1
    # dw: the unsharded batch sum split over the ranks (float32 sums of the same products)
    dw = local["dw"].clone()
    dist.all_reduce(dw)
    gt, xt = g, x
    if recipe.rht:
        gt, xt = bs.hadamard16(g, bs.rht_signs(11)), bs.hadamard16(x, bs.rht_signs(11))
    mag = gt.abs().T.double() @ xt.abs().double()
    bound = 2 * M * torch.finfo(torch.float32).eps * 4 * mag
    assert ((dw.double() - full["dw"].double()).abs() <= bound).all(), f"{name} dw outside the float32 bound"
    return n


def check_fsdp2(name, rank, world, policy=None):
    """One FSDP2 training step of a block-scaled model against the unsharded step."""
    from dualprec_torch import Precision
    from dualprec_torch.blockscale import DP_GROUP_ATTR
    from dualprec_torch.sharding import shard

    policy = policy or f"32-true,fp8={name}"

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(K, 32), nn.ReLU(), nn.Linear(32, N))

    x, _, g = data()
    y = g * 100

    def step(model, prec, xb, yb, scale):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = prec.setup(model, opt)
        loss = nn.functional.mse_loss(model(xb), yb) * scale
        prec.backward(loss)
        prec.step(opt)
        return model

    ref = step(build(), Precision(policy, device="cpu"), x, y, 1.0)
    prec = Precision(policy, device="cpu")
    sharded = shard(build(), prec.policy)
    assert name == "control" or getattr(sharded[0], DP_GROUP_ATTR) is not None
    rows = slice(rank * M // world, (rank + 1) * M // world)
    sharded = step(sharded, prec, x[rows], y[rows], 1.0)  # FSDP2 averages the ranks' gradients
    p0 = dict(build().named_parameters())
    for (n, p), (_, r) in zip(sharded.named_parameters(), ref.named_parameters()):
        full = p.full_tensor().detach()
        moved = (r.detach() - p0[n].detach()).abs().max()
        err = (full - r.detach()).abs().max()
        assert err <= 1e-4 * moved + 1e-7, f"{name} {n}: FSDP2 step differs by {err:.3g} (the step moved {moved:.3g})"
    st = [m.blockscale_state.tolist() for m in sharded.modules() if hasattr(m, "blockscale_state")]
    assert name == "control" or (st and all(s[1] == 1 for s in st)), st


def check_fsdp2_resume(name, rank, world, out_dir):
    """An FSDP2-sharded block-scaled model checkpointed with torch.distributed.checkpoint after
    two steps resumes bit-identically: a fresh sharded model loaded from it takes the same
    third step (parameters and [seed, step] state) as the run that never stopped."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from dualprec_torch import Precision
    from dualprec_torch.sharding import shard

    policy = f"32-true,fp8={name}"
    x, _, g = data()
    rows = slice(rank * M // world, (rank + 1) * M // world)
    xs, ys = x[rows], (g * 100)[rows]

    def build():
        torch.manual_seed(0)
        prec = Precision(policy, device="cpu")
        model = shard(nn.Sequential(nn.Linear(K, 32), nn.ReLU(), nn.Linear(32, N)), prec.policy)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = prec.setup(model, opt)
        return prec, model, opt

    def step(prec, model, opt, i):
        opt.zero_grad()
        prec.backward(nn.functional.mse_loss(model(xs * (1 + i)), ys))
        prec.step(opt)

    prec, model, opt = build()
    for i in range(2):
        step(prec, model, opt, i)
    ckpt = os.path.join(out_dir, f"dcp-{name}")
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt)
    step(prec, model, opt, 2)
    prec2, model2, opt2 = build()
    sd = {"model": get_model_state_dict(model2)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd["model"])
    step(prec2, model2, opt2, 2)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), f"{name} {n}: resumed FSDP2 run differs"
    sa = [m.blockscale_state.tolist() for m in model.modules() if hasattr(m, "blockscale_state")]
    sb = [m.blockscale_state.tolist() for m in model2.modules() if hasattr(m, "blockscale_state")]
    assert sa == sb and all(s[1] == 3 for s in sa), (sa, sb)


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    lines = []
    try:
        try:  # the harness itself: a float32 model without FP8 gives the unsharded step
            check_fsdp2("control", rank, world, "32-true")
            lines.append("OK control fsdp2-step")
        except Exception:  # noqa: BLE001
            lines.append(f"FAIL control: {traceback.format_exc()}")
        for name, recipe in RECIPES.items():
            try:
                n = check_parts(name, recipe, rank, world)
                lines.append(f"OK {name} codes-and-scales {n}")
                check_fsdp2(name, rank, world)
                lines.append(f"OK {name} fsdp2-step")
                check_fsdp2_resume(name, rank, world, out_dir)
                lines.append(f"OK {name} fsdp2-resume")
            except Exception:  # noqa: BLE001 - reported to the test through the file
                lines.append(f"FAIL {name}: {traceback.format_exc()}")
        for name in ("mxfp8", "nvfp4"):  # under autocast: FSDP2 gathers the float32 parameter
            try:
                check_fsdp2(name, rank, world, f"bf16-mixed,fp8={name}")
                lines.append(f"OK {name} fsdp2-step-bf16-mixed")
            except Exception:  # noqa: BLE001
                lines.append(f"FAIL {name} bf16-mixed: {traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        dist.destroy_process_group()
    leave_spawned_worker()
