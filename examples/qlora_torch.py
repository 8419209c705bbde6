"""QLoRA in PyTorch: NF4 base weights (frozen, bitsandbytes' layers) and a trainable low-rank
adapter on every linear layer, then the quantized base + adapter saved with safetensors.

    python examples/qlora_torch.py [--policy "bf16-mixed,quant=nf4"] [--steps 150] [--save qlora_torch.safetensors]

qlora_flax.py --from-torch qlora_torch.safetensors loads that file in JAX.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from common import batches, initial_weights, progress, write_losses
from qlora_common import EVAL_KEY, LAYERS, RANK, SCALE, adapter_init, eval_batch, fine_tune_task, parse_args
from safetensors.torch import save_file
from torch import nn

from dualprec import Policy
from dualprec_torch import Precision


class LoRALinear(nn.Module):
    """``base(x) + (x @ A.T) @ B.T * scale``: the base is an nn.Linear that Precision.setup
    quantizes (at path ``<name>.base``); A and B are plain Parameters, so they stay float."""

    def __init__(self, base: nn.Linear, lora_a: np.ndarray, lora_b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.from_numpy(lora_a.copy()))  # [r, in]
        self.lora_B = nn.Parameter(torch.from_numpy(lora_b.copy()))  # [out, r]
        self.scale = scale

    def forward(self, x):
        y = self.base(x)
        t = nn.functional.linear(x.to(y.dtype), self.lora_A.to(y.dtype))  # each product rounded once,
        u = nn.functional.linear(t, self.lora_B.to(y.dtype))             # as peft on a bnb layer
        return y + u * self.scale


class QLoRAMLP(nn.Module):
    def __init__(self):
        super().__init__()
        adapters = adapter_init()
        for name, (w, b) in zip(LAYERS, initial_weights()):
            base = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                base.weight.copy_(torch.from_numpy(w))
                base.bias.copy_(torch.from_numpy(b))
            setattr(self, name, LoRALinear(base, *adapters[name], SCALE))

    def forward(self, x):
        for i, name in enumerate(LAYERS):
            x = getattr(self, name)(x)
            if i < len(LAYERS) - 1:
                x = nn.functional.gelu(x)
        return x


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    policy = Policy.parse(args.policy)
    precision = Precision(policy, device="cpu")
    model = QLoRAMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = precision.setup(model, optimizer)  # the base Linears become NF4 Linear4bit
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    print(f"torch  {policy}: {trainable} trainable parameters (adapters rank {RANK} + biases); "
          f"base layers {', '.join(type(getattr(model, n).base).__name__ for n in LAYERS)}")
    x, y = fine_tune_task()
    losses = []
    with progress(args.quiet) as bar:
        job = bar.add_task(f"torch qlora {policy}", total=args.steps)
        for xb, yb in batches(x, y, args.batch, args.steps):
            optimizer.zero_grad()
            with precision.autocast():
                out = precision.convert_output(model(precision.convert_input(torch.from_numpy(xb))))
                loss = nn.functional.mse_loss(out.float(), torch.from_numpy(yb))
            precision.backward(loss)
            precision.step(optimizer)
            losses.append(float(loss.detach()))
            bar.update(job, advance=1, description=f"torch qlora loss {losses[-1]:.4f}")
    print(f"torch  {policy}: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps")

    model.eval()
    with torch.no_grad(), precision.autocast():
        probe = precision.convert_output(model(precision.convert_input(torch.from_numpy(eval_batch())))).float()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors[EVAL_KEY] = probe.contiguous()
    save_file(tensors, args.save, metadata={"policy": str(policy), "lora": json.dumps({"rank": RANK, "scale": SCALE})})
    print(f"saved the NF4 base + adapter ({len(tensors)} tensors) to {args.save}")
    write_losses(args.losses, "torch", str(policy), losses)


if __name__ == "__main__":
    main()
