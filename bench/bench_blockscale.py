"""Block-scaled training GEMMs on the CPU: what emulating each recipe costs, per backend,
against a bfloat16 autocast linear and against torchao's own emulation in the same run.

    python bench/bench_blockscale.py [--tokens 256] [--shape 1024x1024] [--rounds 5]
        [--threads N] [--name blockscale] [--out-dir DIR]

Rows, per recipe (rowwise, rowwise_with_gw_hp, mxfp8 (rceil), nvfp4 (sr, rht, 16x16)), one
training step of one linear layer (forward, and the backward to the input and weight of
``sum(y**2)``) on ``tokens x in`` float32 inputs:

- ``torch``: ``dualprec_torch.blockscale.BlockScaledLinear`` (quantize-dequantize emulation in
  torch, float32 GEMMs);
- ``jax``: ``dualprec_jax.blockscale.block_linear`` under ``jax.jit`` (``jax.grad``);
- ``torchao`` (row-wise recipes only): torchao's ``Float8Linear`` with ``emulate=True`` and
  its recipe of the same name, the peer the row-wise recipe is defined against;
- ``bf16``: ``nn.Linear`` under ``torch.autocast("cpu", bfloat16)``, the step the recipe
  replaces.

Every row of a recipe is timed interleaved with the others (bench.harness.time_interleaved);
ratios are median over median against the ``bf16`` row and, for row-wise, the ``torchao``
row of the same run.  Emulation cost only: no CPU has block-scaled GEMM units, so these rows
say what a CPU test of a recipe costs, not what a GPU would gain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402

RECIPES = ("rowwise", "rowwise_with_gw_hp", "mxfp8", "nvfp4")


def _torch_train_step(model, x, autocast_dtype=None):
    """One step of ``model`` on a leaf copy of ``x``: forward (under CPU autocast to
    ``autocast_dtype`` if given), backward of ``sum(y**2)`` to the input and the parameters."""
    import contextlib

    import torch

    xt = x.clone().requires_grad_(True)

    def step():
        model.zero_grad(set_to_none=True)
        xt.grad = None
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            y = model(xt)
        (y.float() ** 2).sum().backward()
        return xt.grad

    return step


def _torch_step(recipe_name: str, x, w):
    import torch

    from dualprec import Policy
    from dualprec_torch.blockscale import BlockScaledLinear

    recipe = Policy.parse(f"bf16-mixed,fp8={recipe_name}").fp8
    layer = BlockScaledLinear(w.shape[1], w.shape[0], bias=False, recipe=recipe, seed=0)
    with torch.no_grad():
        layer.weight.copy_(w)
    return _torch_train_step(layer, x)


def _jax_step(recipe_name: str, x, w):
    import jax
    import jax.numpy as jnp

    from dualprec import Policy
    from dualprec_jax.blockscale import block_linear

    recipe = Policy.parse(f"bf16-mixed,fp8={recipe_name}").fp8
    xj, wj = jnp.asarray(x.numpy()), jnp.asarray(w.numpy())
    grad = jax.jit(jax.grad(lambda a, b: (block_linear(a, b, recipe) ** 2).sum(), argnums=(0, 1)))

    def step():
        return jax.block_until_ready(grad(xj, wj))

    return step


def _torchao_step(recipe_name: str, x, w):
    import torch
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    cfg = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe_name), emulate=True)
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    convert_to_float8_training(model, config=cfg)
    return _torch_train_step(model, x)


def _bf16_step(x, w):
    import torch

    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return _torch_train_step(layer, x, torch.bfloat16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--shape", default="1024x1024", help="out x in (torch's weight shape)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--name", default="blockscale")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    import torch

    env = harness.cpu_environment(args.threads)
    path = harness.results_path(args.name, env, args.out_dir)
    out_f, in_f = (int(s) for s in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, in_f, generator=gen)
    w = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
    result = {"name": args.name, "environment": env, "tokens": args.tokens, "shape": [out_f, in_f], "rows": []}
    for name in [r for r in args.recipes.split(",") if r]:
        steps = {"bf16": _bf16_step(x, w), "torch": _torch_step(name, x, w), "jax": _jax_step(name, x, w)}
        if name.startswith("rowwise"):
            steps["torchao"] = _torchao_step(name, x, w)
        timings = harness.time_interleaved(steps, warmup=2, rounds=args.rounds, steps_per_round=args.steps)
        med = {k: t.stats.median for k, t in timings.items()}
        for impl, t in timings.items():
            st = t.stats
            row = {"recipe": name, "impl": impl, "median_ms": st.median * 1e3, "min_ms": st.min * 1e3,
                   "max_ms": st.max * 1e3, "first_call_ms": t.first_call_s * 1e3, "samples": len(t.samples),
                   "ratio_to_bf16": med[impl] / med["bf16"]}
            if "torchao" in med:
                row["ratio_to_torchao"] = med[impl] / med["torchao"]
            result["rows"].append(row)
            print(f"{name:20s} {impl:8s} {st.median * 1e3:9.2f} ms  x{row['ratio_to_bf16']:.2f} of bf16"
                  + (f"  x{row['ratio_to_torchao']:.2f} of torchao" if "ratio_to_torchao" in row else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
