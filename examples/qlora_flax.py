"""QLoRA in Flax (linen): NF4 base weights (frozen, bitsandbytes' bits) and a trainable low-rank
adapter on every Dense layer, trained with dualprec_jax's TrainState; or the checkpoint that
qlora_torch.py saved, loaded and checked against torch's forward, then trained further.

    python examples/qlora_flax.py [--policy "bf16-mixed,quant=nf4"] [--steps 150]
    python examples/qlora_flax.py --from-torch qlora_torch.safetensors [--steps 50]
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import batches, progress, write_losses
from qlora_common import EVAL_KEY, LAYERS, SCALE, adapter_init, eval_batch, fine_tune_task, parse_args
from train_flax import MLP, initial_params

from dualprec import Policy
from dualprec_jax import Precision, quant, scale_loss
from dualprec_jax.train_state import TrainState


def with_adapters(params: dict, adapters: dict) -> dict:
    """``params`` with each layer's adapter set from peft's layout (lora_A [r, in], lora_B
    [out, r]) to dualprec_jax.quant's (lora_a [in, r], lora_b [r, out], lora_scale)."""
    out = dict(params)
    for name, (a, b) in adapters.items():
        out[name] = {**params[name], "lora_a": jnp.asarray(np.asarray(a).T), "lora_b": jnp.asarray(np.asarray(b).T),
                     "lora_scale": jnp.asarray(SCALE, jnp.float32)}
    return out


def fresh_params(precision: Precision) -> dict:
    """The example's float weights quantized to NF4 by the policy, with the shared adapter init."""
    params = quant.quantize_params(precision.cast_to_param(initial_params()), precision.policy)
    return with_adapters(params, adapter_init())


def torch_params(path: str, precision: Precision) -> tuple[dict, np.ndarray]:
    """The params of qlora_torch.py's checkpoint, and the torch forward stored with it.  The
    base layers' tensors are bitsandbytes' state dict (``<layer>.base.weight``, ``.absmax`` ...)
    and load through `dualprec_jax.quant.from_bnb_state_dict`; the adapters are transposed."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, framework="numpy") as f:
        saved = Policy.parse(f.metadata()["policy"])
    if saved != precision.policy:
        raise SystemExit(f'{path} was trained under "{saved}"; run with --policy "{saved}"')
    tensors = load_file(path)
    base = {k.replace(".base.", ".", 1): v for k, v in tensors.items() if ".base." in k}
    template = jax.eval_shape(lambda: precision.cast_to_param(initial_params()))
    params = quant.from_bnb_state_dict(base, template, precision.policy)
    adapters = {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in LAYERS}
    return with_adapters(params, adapters), tensors[EVAL_KEY]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], flax=True)
    precision = Precision(args.policy)
    policy = precision.policy
    model = MLP(tuple(int(w.shape[0]) for w in (v["bias"] for v in initial_params().values())))
    record = {}
    if args.from_torch:
        params, torch_out = torch_params(args.from_torch, precision)
    else:
        params = fresh_params(precision)
    trainable, frozen = quant.split_params(params)  # qweight and lora_scale frozen

    def forward(trainable, x):
        return precision.apply(model, {"params": quant.merge_params(trainable, frozen)}, precision.convert_input(x))

    if args.from_torch:
        jax_out = np.asarray(jax.jit(forward)(trainable, jnp.asarray(eval_batch())), np.float32)
        gap = float(np.max(np.abs(jax_out - torch_out)))
        rel = gap / float(np.max(np.abs(torch_out)))
        own = fresh_params(precision)  # JAX quantizing the same float weights itself
        same = all(bool(jnp.array_equal(params[n][quant.QWEIGHT][k], own[n][quant.QWEIGHT][k]))
                   for n in LAYERS for k in own[n][quant.QWEIGHT])
        record.update(max_abs_gap=gap, relative_gap=rel, same_codes=same)
        print(f"flax   forward on the torch checkpoint: max |jax - torch| = {gap:.3g} "
              f"({rel:.2%} of max |torch|) on {len(torch_out)} held-out inputs; NF4 codes and absmax "
              f"{'identical to' if same else 'DIFFERENT from'} JAX's own quantization")

    state = TrainState.create(apply_fn=forward, params=trainable, tx=optax.adam(args.lr), precision=precision)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    print(f"flax   {policy}: {n_train} trainable parameters (adapters + biases)")

    @jax.jit
    def train_step(state, xb, yb):
        def loss_fn(p):
            loss = jnp.mean((state.apply_fn(p, xb).astype(jnp.float32) - yb) ** 2)
            return scale_loss(loss, state.loss_scale), loss

        grads, loss = jax.grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss

    x, y = fine_tune_task()
    losses = []
    with progress(args.quiet) as bar:
        job = bar.add_task(f"flax  qlora {policy}", total=args.steps)
        for xb, yb in batches(x, y, args.batch, args.steps):
            state, loss = train_step(state, jnp.asarray(xb), jnp.asarray(yb))
            losses.append(float(loss))
            bar.update(job, advance=1, description=f"flax  qlora loss {losses[-1]:.4f}")
    if losses:
        print(f"flax   {policy}: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps")
    write_losses(args.losses, "flax", str(policy), losses)
    if args.losses and record:
        path = Path(args.losses)
        path.write_text(json.dumps({**json.loads(path.read_text()), **record}))


if __name__ == "__main__":
    main()
