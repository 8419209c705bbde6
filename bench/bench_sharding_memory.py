"""Per-rank bytes per parameter under sharding, per policy, against unsharded: torch FSDP2
over 2 gloo ranks on CPU, JAX over 4 host devices with FSDP-style rules.

    python bench/bench_sharding_memory.py

Counts the storage each rank/device holds for parameters, gradients and Adam's two moments
(measured from the tensors / arrays themselves), divided by the model's parameter count.
Writes bench/results/<date>-<machine>-sharding-memory.json.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
D, HIDDEN, BLOCKS = 256, 1024, 4


def _torch_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from dualprec_torch import Precision
    from dualprec_torch.sharding import local_tensor, shard

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = {}
    for policy in POLICIES:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D))
                                for _ in range(BLOCKS)])
        n = sum(p.numel() for p in model.parameters())
        precision = Precision(policy, device="cpu")
        if world > 1:
            model = shard(model, precision.policy)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model, optimizer = precision.setup(model, optimizer)
        x = torch.randn(8, D)
        with precision.autocast():
            loss = model(precision.convert_input(x)).float().pow(2).mean()
        precision.backward(loss)
        precision.step(optimizer)

        def nbytes(ts):  # each storage once (FSDP2 may keep several shards in one buffer)
            storages = {}
            for t in ts:
                if t is not None:
                    st = local_tensor(t).untyped_storage()
                    storages[st.data_ptr()] = st.nbytes()
            return sum(storages.values())

        params = [p for p in model.parameters()]
        state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
        rows[policy] = {"params": n, "weights": nbytes(params) / n, "grads": nbytes(p.grad for p in params) / n,
                        "optimizer": nbytes(state) / n}
        rows[policy]["total"] = sum(rows[policy][k] for k in ("weights", "grads", "optimizer"))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def torch_rows(world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        if world == 1:
            _torch_rank(0, 1, 0, out)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_torch_rank, args=(world, port, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


JAX_CODE = r"""
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dualprec_jax import Precision
from dualprec_jax.sharding import fsdp_rules, shard_params
D, HIDDEN, BLOCKS, SHARDED = %d, %d, %d, %s
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(BLOCKS):
            x = nn.Dense(D, name=f"down_{i}")(nn.gelu(nn.Dense(HIDDEN, name=f"up_{i}")(x)))
        return x
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = {}
for policy in %r:
    prec = Precision(policy)
    model = MLP()
    params = prec.init(model, jax.random.key(0), jnp.ones((1, D)))["params"]
    n = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    if SHARDED:
        params = shard_params(params, mesh, fsdp_rules(params, mesh, "data", min_size=1024))
    tx = prec.wrap_optimizer(optax.adam(1e-3))
    state = tx.init(params)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(prec.apply(model, {"params": p}, jnp.ones((8, D))) ** 2)))(params)
    def per_device(tree):
        leaves = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "addressable_shards") and x.ndim > 0]
        return sum(x.addressable_shards[0].data.nbytes for x in leaves) / n
    rows[policy] = {"params": n, "weights": per_device(params), "grads": per_device(grads),
                    "optimizer": per_device(state.inner)}
    rows[policy]["total"] = rows[policy]["weights"] + rows[policy]["grads"] + rows[policy]["optimizer"]
print(json.dumps(rows))
"""


def jax_rows(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    code = JAX_CODE % (D, HIDDEN, BLOCKS, devices > 1, POLICIES)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    sys.path.insert(0, str(ROOT))
    results = {"torch": {"unsharded": torch_rows(1), "fsdp2_2_ranks": torch_rows(2)},
               "jax": {"unsharded": jax_rows(1), "sharded_4_devices": jax_rows(4)}}
    for backend, runs in results.items():
        (base, sharded) = runs.values()
        for policy in POLICIES:
            sharded[policy]["ratio_to_unsharded"] = sharded[policy]["total"] / base[policy]["total"]
    machine = platform.node().split(".")[0] or "cpu"
    doc = {"benchmark": "sharding-memory", "date": datetime.date.today().isoformat(), "machine": machine,
           "cpu_count": os.cpu_count(), "model": {"d": D, "hidden": HIDDEN, "blocks": BLOCKS},
           "unit": "bytes per parameter held by one rank / device (weights, gradients, Adam moments)",
           "results": results}
    out = ROOT / "bench" / "results" / f"{doc['date']}-{machine}-sharding-memory.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for backend, runs in results.items():
        for run, rows in runs.items():
            for policy, r in rows.items():
                print(f"{backend:5} {run:18} {policy:10} weights {r['weights']:.3f} grads {r['grads']:.3f} "
                      f"optimizer {r['optimizer']:.3f} total {r['total']:.3f}")
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
