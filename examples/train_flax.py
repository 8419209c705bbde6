"""Train the example MLP in Flax (linen) under the policy in policy.toml.

    python examples/train_flax.py [--policy-file examples/policy.toml] [--steps 200]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from common import SIZES, batches, initial_weights, parse_args, progress, task, write_losses

from dualprec import Policy
from dualprec_jax import Precision


class MLP(nn.Module):
    features: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.gelu(x, approximate=False)  # torch's nn.GELU() default
        return x


def initial_params() -> dict:
    """The shared NumPy weights in Flax's layout (kernel = weight transposed)."""
    return {f"dense_{i}": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}
            for i, (w, b) in enumerate(initial_weights())}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    policy = Policy.load(args.policy_file)
    precision = Precision(policy)
    model = MLP(SIZES[1:])
    x, y = task()
    variables = precision.init(model, jax.random.key(0), jnp.asarray(x[:1]))
    params = precision.cast_to_param({"params": initial_params()})["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(variables["params"])
    tx = precision.wrap_optimizer(optax.adam(args.lr))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        def loss_fn(p):
            out = precision.apply(model, {"params": p}, precision.convert_input(xb))
            loss = jnp.mean((out.astype(jnp.float32) - yb) ** 2)
            return precision.scale_loss(loss, opt_state.loss_scale), loss

        grads, loss = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    with progress(args.quiet) as bar:
        job = bar.add_task(f"flax  {policy}", total=args.steps)
        for xb, yb in batches(x, y, args.batch, args.steps):
            params, opt_state, loss = train_step(params, opt_state, jnp.asarray(xb), jnp.asarray(yb))
            losses.append(float(loss))
            bar.update(job, advance=1, description=f"flax  {policy} loss {losses[-1]:.4f}")
    print(f"flax   {policy}: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps")
    write_losses(args.losses, "flax", str(policy), losses)


if __name__ == "__main__":
    main()
