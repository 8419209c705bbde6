"""Train the example MLP in PyTorch under the policy in policy.toml.

    python examples/train_torch.py [--policy-file examples/policy.toml] [--steps 200]
"""

from __future__ import annotations

import torch
from common import batches, initial_weights, parse_args, progress, task, write_losses
from torch import nn

from dualprec import Policy
from dualprec_torch import Precision


def build_model() -> nn.Sequential:
    layers, weights = [], initial_weights()
    for i, (w, b) in enumerate(weights):
        linear = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(b))
        layers += [linear, nn.GELU()] if i < len(weights) - 1 else [linear]
    return nn.Sequential(*layers)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    policy = Policy.load(args.policy_file)
    precision = Precision(policy, device="cpu")
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = precision.setup(model, optimizer)
    x, y = task()
    losses = []
    with progress(args.quiet) as bar:
        job = bar.add_task(f"torch {policy}", total=args.steps)
        for xb, yb in batches(x, y, args.batch, args.steps):
            optimizer.zero_grad()
            with precision.autocast():
                out = precision.convert_output(model(precision.convert_input(torch.from_numpy(xb))))
                loss = torch.nn.functional.mse_loss(out.float(), torch.from_numpy(yb))
            precision.backward(loss)
            precision.step(optimizer)
            losses.append(float(loss.detach()))
            bar.update(job, advance=1, description=f"torch {policy} loss {losses[-1]:.4f}")
    print(f"torch  {policy}: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps")
    write_losses(args.losses, "torch", str(policy), losses)


if __name__ == "__main__":
    main()
