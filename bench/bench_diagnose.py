"""What `diagnose` costs on the CPU: wall time and number of runs, per model and backend.

    python bench/bench_diagnose.py [--models transformer,fragile,gpt12] [--backends torch,jax]
        [--policy 16-mixed] [--steps 3] [--no-gains] [--out bench/results/NAME.json]

``gpt12`` is a 12-layer GPT-style model (token embedding, 12 pre-norm blocks of LayerNorm,
attention and a GELU MLP, a final LayerNorm and an LM head; width 64, 4 heads, vocabulary
128, batch 4 x 16 tokens): 111 modules, so the search runs 2 + 2N + k + k' variants of
``--steps`` steps each.  ``loadavg_1min`` is the machine's load after each row; ``cpu_s`` (this process's CPU time) is the figure to compare on a
shared machine; ``wall_s`` includes waiting for a core.  It is also a ``module:function`` factory for the CLI:
``dualprec diagnose --model bench.bench_diagnose:gpt12 --policy 16-mixed`` (torch only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

VOCAB, WIDTH, HEADS, LAYERS, BATCH, TOKENS = 128, 64, 4, 12, 4, 16


def _torch_gpt():
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
            self.proj = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(out.transpose(1, 2).reshape(b, t, d))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
            self.fc2 = nn.Linear(4 * WIDTH, WIDTH)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn = nn.LayerNorm(WIDTH), Attention()
            self.ln2, self.mlp = nn.LayerNorm(WIDTH), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(WIDTH)
            self.lm_head = nn.Linear(WIDTH, VOCAB)

        def forward(self, idx):
            x = self.embed(idx)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    return GPT()


def gpt12(backend: str) -> dict:
    """The CLI factory: {"model", "batch"} for torch."""
    if backend != "torch":
        raise ValueError("gpt12 is a torch model only; use --backend torch")
    import torch

    torch.manual_seed(0)
    model = _torch_gpt()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g),
                torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)) for _ in range(3)]
    return {"model": model, "batch": batches}


def measure(model: str, backend: str, policy: str, steps: int, gains: bool) -> dict:
    from dualprec.diagnose_cli import load_model

    got = gpt12(backend) if model == "gpt12" else load_model(model, backend, 0, steps)
    t, c = time.perf_counter(), time.process_time()
    if backend == "torch":
        import dualprec_torch

        rep = dualprec_torch.diagnose(got["model"], got["batch"], policy, loss_fn=got.get("loss_fn"), steps=steps,
                                      gains=gains, name=model)
    else:
        import dualprec_jax

        rep = dualprec_jax.diagnose(got["model"], got["variables"], got["batch"], policy, steps=steps,
                                    gains=gains, name=model)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = len(rep.ranking)
    return {"model": model, "backend": backend, "policy": policy, "steps": steps, "gains": gains,
            "modules": len(rep.modules), "candidates": n, "runs": rep.runs, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "s_per_run": round(wall / rep.runs, 3), "threads": __import__("torch").get_num_threads(), "timings": {k: round(v, 2) for k, v in rep.timings.items()},
            "error": rep.error if math.isfinite(rep.error) else str(rep.error), "suggested": rep.suggested,
            "suggested_error": rep.suggested_error, "top": rep.ranking[:3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="transformer,fragile,gpt12")
    p.add_argument("--backends", default="torch,jax")
    p.add_argument("--policy", default="16-mixed")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-gains", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads and XLA CPU threads (0: the "
                   "libraries' defaults); on a loaded machine 1 avoids thread-pool contention on these tiny ops")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            if model == "gpt12" and backend != "torch":
                continue
            row = measure(model, backend, args.policy, args.steps, not args.no_gains)
            row["loadavg_1min"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
