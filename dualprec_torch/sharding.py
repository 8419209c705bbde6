"""Sharded training with torch FSDP2: the Policy as FSDP2's `MixedPrecisionPolicy`, applied
per block with `fully_shard`, and one loss-scale decision for all ranks.

    precision = Precision("bf16-mixed")
    model = shard(model, precision.policy, mesh=mesh)      # fully_shard per block, then the root
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = precision.setup(model, optimizer)   # the usual loop from here on

FSDP2 gathers parameters in their stored dtype (``param_dtype=None``), so the forward under
`Precision.autocast` computes exactly what the unsharded model computes; gradients are
reduce-scattered in the policy's ``reduce_dtype``.  ``gather="compute"`` gathers in the
compute dtype instead (half the all-gather traffic under a mixed policy; norms then see
rounded weights, unlike unsharded autocast).

Loss scaling: each rank only sees its own gradient shards, so a non-finite value lands on
one rank.  `reduce_found_inf` all-reduces the per-rank flags (MAX, waited for before
anything reads them) so every rank skips the same steps and keeps the same scale.

The same holds without sharding (DistributedDataParallel, Fabric's ``ddp`` strategy): DDP's
all-reduce spreads an inf to every rank only for the gradients it reduces, so a parameter
DDP ignores, a step inside ``no_sync()`` or a gradient changed on one rank after the
reduction (a per-rank clip, a hook) leaves the others finite.  `decision_group` picks the
group the flags are all-reduced over: with torch.distributed initialised and more than one
rank, every `Precision.step` takes one decision for all ranks.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from dualprec import Policy
from dualprec.errors import PolicyError, UnsupportedPolicyError

from .casts import torch_dtype
from .modules import _cast_tensors

__all__ = ["mixed_precision_policy", "shard", "default_blocks", "reduce_found_inf", "decision_group",
           "check_process_group", "is_sharded", "local_tensor", "local_shards", "SUPPORTED_COMBINATIONS"]

#: What runs under FSDP2 here, and what is refused (with the reason given to the user).
SUPPORTED_COMBINATIONS = {
    "float policies (32-true, bf16-mixed, 16-mixed, bf16-true, ...)": "supported",
    "per-module overrides": "supported: each block gets the MixedPrecisionPolicy of its own path",
    "dynamic / static loss scaling": "supported: one all-reduced overflow decision for every rank",
    "master=true": "refused: FSDP2 keeps sharded parameters in their stored dtype; use float32 "
                   "params with a half compute dtype (bf16-mixed, 16-mixed) instead",
    "quantization": "refused: bitsandbytes layers are not sharded by this backend yet",
    "fp8 (delayed, current)": "refused: the per-tensor FP8 amax is not reduced over the data-parallel group yet",
    "fp8 block-scaled (rowwise, rowwise_with_gw_hp, mxfp8, nvfp4)": "supported: batch amaxes all-reduced "
        "(MAX) over the data-parallel group, SR bits drawn at global indices; the per-rank batch must be a "
        "multiple of the blocks along it (32 for mxfp8, 16 for nvfp4); on the native layers "
        "(engine=transformer-engine refused); docs/block-scaling.md",
}



def mixed_precision_policy(policy: Policy, *, root: bool = False, gather: str = "param"):
    """FSDP2's ``MixedPrecisionPolicy`` for one module's policy.

    ``param_dtype`` stays None (gather the stored dtype; autocast casts per op) unless
    ``gather="compute"``; ``reduce_dtype`` is the policy's; ``output_dtype`` is set on the
    root module only (blocks pass their outputs on in the compute dtype, as unsharded)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if gather not in ("param", "compute"):
        raise ValueError(f'gather must be "param" or "compute", got {gather!r}')
    param = torch_dtype(policy.compute_dtype) if gather == "compute" and policy.is_mixed else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=torch_dtype(policy.reduce_dtype),
                                output_dtype=torch_dtype(policy.output_dtype) if root else None,
                                cast_forward_inputs=param is not None)


def _refuse_combinations(policy: Policy) -> None:
    for path, p in policy.policies():
        where = f" (override @{path})" if path else ""
        if p.quantization is not None:
            raise UnsupportedPolicyError(f'"{policy}"{where}: quantization + FSDP2: '
                                         f"{SUPPORTED_COMBINATIONS['quantization']}")
        if p.fp8 is not None and not p.fp8.block_scaled:
            raise UnsupportedPolicyError(f'"{policy}"{where}: fp8={p.fp8.scaling} + FSDP2: '
                                         f'{SUPPORTED_COMBINATIONS["fp8 (delayed, current)"]}')
        if p.fp8 is not None and p.fp8.engine == "transformer-engine":
            raise UnsupportedPolicyError(f'"{policy}"{where}: fp8={p.fp8.scaling}(engine=transformer-engine) + '
                                         "FSDP2: shard() runs the block recipes on the native layers (their "
                                         "amax reductions over the data-parallel group); use engine=native or auto")
    if policy.master_weights:
        raise UnsupportedPolicyError(f'"{policy}": master=true + FSDP2: {SUPPORTED_COMBINATIONS["master=true"]}')


def default_blocks(model: nn.Module) -> list[str]:
    """The paths FSDP2 shards separately by default: each entry of every ModuleList /
    Sequential that holds parameters, or else each direct child that holds parameters."""
    found = [name for name, m in model.named_modules() if name and isinstance(m, (nn.ModuleList, nn.Sequential))]
    blocks = [f"{c}.{i}" for c in found for i, sub in enumerate(model.get_submodule(c))
              if any(True for _ in sub.parameters())]
    if not blocks:
        blocks = [name for name, sub in model.named_children() if any(True for _ in sub.parameters())]
    return blocks


def _select(model: nn.Module, blocks) -> list[str]:
    if blocks is None:
        return default_blocks(model)
    if callable(blocks):
        return [name for name, m in model.named_modules() if name and blocks(m, name)]
    names = [name for name, _ in model.named_modules() if name]
    chosen = []
    for pattern in ([blocks] if isinstance(blocks, str) else list(blocks)):
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            from dualprec.errors import did_you_mean

            raise PolicyError(f"shard(blocks=...): {pattern!r} matches no module{did_you_mean(pattern, names)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def shard(model: nn.Module, policy, *, mesh=None, blocks: Iterable[str] | Callable | None = None,
          gather: str = "param", reshard_after_forward: bool | None = None) -> nn.Module:
    """``fully_shard`` each block (see `default_blocks`; ``blocks`` takes path patterns or a
    ``(module, path) -> bool``), then the root, each with the MixedPrecisionPolicy of its
    path's policy.  Needs an initialised process group (or ``mesh``)."""
    from torch.distributed.fsdp import fully_shard

    policy = Policy.parse(policy)
    _refuse_combinations(policy)
    if mesh is None and not dist.is_initialized():
        raise RuntimeError("shard(): no process group; call torch.distributed.init_process_group "
                           "(torchrun sets it up) or pass mesh=init_device_mesh(...)")
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    # FSDP2 keeps each shard in the dtype it finds: parameters take their policy's param
    # dtype before they are sharded (Precision.setup's cast is then a no-op)
    for path, module in model.named_modules():
        _cast_tensors(module, torch_dtype(policy.for_module(path).param_dtype))
    if any(p.fp8 is not None and p.fp8.block_scaled for _, p in policy.policies()):
        from . import fp8
        from .blockscale import DP_GROUP_ATTR, BlockScaledLinear

        # convert before fully_shard: FSDP2 turns each sharded Linear into a subclass, which
        # Precision.setup's conversion would leave as it is (a plain float32 GEMM)
        model = fp8.convert_module(model, policy, engine="native")  # auto: native under FSDP2 (docs/block-scaling.md)
        group = mesh.get_group() if mesh is not None else dist.group.WORLD
        for module in model.modules():
            if isinstance(module, BlockScaledLinear):
                setattr(module, DP_GROUP_ATTR, group)
    paths = _select(model, blocks)
    for path in sorted(paths, key=lambda p: -p.count(".")):  # children before their parents
        fully_shard(model.get_submodule(path), mp_policy=mixed_precision_policy(policy.for_module(path),
                                                                                 gather=gather), **kwargs)
    fully_shard(model, mp_policy=mixed_precision_policy(policy, root=True, gather=gather), **kwargs)
    return model


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, _dtensor_type())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage); a plain tensor as it is."""
    return t._local_tensor if is_sharded(t) else t


def local_shards(grads: list[torch.Tensor]):
    """(this rank's shard of each gradient, the process group they are sharded on or None),
    in one pass: `Precision.unscale_` calls it once per optimizer step."""
    dtensor = _dtensor_type() if dist.is_available() and dist.is_initialized() else None
    if dtensor is None:
        return grads, None
    group, shards = None, []
    for g in grads:
        if isinstance(g, dtensor):
            group = group or g.device_mesh.get_group()
            g = g._local_tensor
        shards.append(g)
    return shards, group


def check_process_group(process_group):
    """``Precision(..., process_group=...)``: "auto", None or a torch.distributed ProcessGroup."""
    if process_group is None or (isinstance(process_group, str) and process_group == "auto"):
        return process_group
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise ValueError(f"Precision(policy, process_group=...): {process_group!r} is not a process group; use "
                     '"auto" (the default group once torch.distributed is initialised), None (each rank '
                     "decides alone) or a torch.distributed ProcessGroup")


def decision_group(sharded_group, model=None, process_group="auto"):
    """The process group whose ranks take one skip/step decision (and one loss-scale update),
    or None (this rank decides alone).

    ``process_group``: a ProcessGroup is used as given; None keeps the decision per rank
    except for FSDP2-sharded gradients (``sharded_group``, the group `local_shards` found: a
    rank's shards alone cannot decide); "auto" takes ``sharded_group``, else the group of a
    DistributedDataParallel ``model``, else the default group, when torch.distributed is
    initialised with more than one rank.  Every rank must then call `Precision.step` for the
    same steps (data-parallel training does)."""
    if process_group is not None and not isinstance(process_group, str):
        return process_group
    if sharded_group is not None or process_group is None:
        return sharded_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    group = getattr(model, "process_group", None) if isinstance(model, DistributedDataParallel) else None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def reduce_found_inf(found: dict, group) -> dict:
    """All-reduce the per-device non-finite flags over ``group`` (the one `local_shards`
    found; MAX, synchronous, so no rank reads a flag before every rank's is in).  Without a
    group (nothing sharded) the flags are returned as they are."""
    if group is None:
        return found
    devices = list(found)
    flags = torch.stack([found[d].to(devices[0]) for d in devices]) if devices else torch.zeros(1)
    total = flags.max().reshape(1)
    try:
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as e:  # a peer died or hung: say who we are and what was (not) done
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(f"rank {rank} of {world}: the loss-scale overflow all-reduce failed, so another rank "
                           "died or stopped answering before this step was decided; no optimizer step was "
                           f"taken on rank {rank}, and checkpoints written before are intact ({e})") from e
    return {d: total[0].to(d).clone() for d in devices} if devices else {total.device: total[0]}
