"""One op-table path: `Precision.apply` / `init`, nnx and `TrainState` run the model under the
whole table (`dualprec_jax.autocast`), so the README's Flax path gives the agreement with
torch that the op-by-op tests prove; per-module overrides keep their own table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualprec_jax import Precision

torch = pytest.importorskip("torch")  # the torch extra; CI installs it

D_IN, WIDTH, D_OUT, BATCH = 64, 128, 64, 256

# name: (Flax activation as the README's model calls it, torch module)
ACTS = {
    "gelu": (lambda x: nn.gelu(x, approximate=False), lambda: torch.nn.GELU()),
    "gelu-tanh": (lambda x: nn.gelu(x), lambda: torch.nn.GELU(approximate="tanh")),
    "silu": (nn.silu, lambda: torch.nn.SiLU()),
    "sigmoid": (nn.sigmoid, lambda: torch.nn.Sigmoid()),
    "softplus": (nn.softplus, lambda: torch.nn.Softplus()),
    "relu": (nn.relu, lambda: torch.nn.ReLU()),
}


class ReadmeModel(nn.Module):
    """The README's Flax example shape: Dense -> ACT -> LayerNorm -> Dense -> Dense."""
    act: str = "gelu"

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(epsilon=1e-5, name="ln")(ACTS[self.act][0](nn.Dense(WIDTH, name="a")(x)))
        return nn.Dense(D_OUT, name="head")(nn.Dense(WIDTH, name="b")(x))


def _twins(act, seed=0):
    """(torch Sequential, the same weights as Flax variables, input)."""
    torch.manual_seed(seed)
    tm = torch.nn.Sequential(torch.nn.Linear(D_IN, WIDTH), ACTS[act][1](), torch.nn.LayerNorm(WIDTH),
                             torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, D_OUT))
    with torch.no_grad():  # LayerNorm with weights that are not all ones
        tm[2].weight.uniform_(0.5, 1.5)
        tm[2].bias.uniform_(-0.5, 0.5)

    def dense(m):
        return {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}

    ln = {"scale": jnp.asarray(tm[2].weight.detach().numpy()), "bias": jnp.asarray(tm[2].bias.detach().numpy())}
    variables = {"params": {"a": dense(tm[0]), "ln": ln, "b": dense(tm[3]), "head": dense(tm[4])}}
    x = (np.random.default_rng(seed).standard_normal((BATCH, D_IN)) * 2).astype(np.float32)
    return tm, variables, x


def readme_agreement(act, policy):
    """Bitwise-equal fraction of the outputs: torch ``Precision(policy).autocast()`` against
    ``prec.apply(model, variables, x)`` inside ``jax.jit`` (the README's path); and the dtypes."""
    from dualprec_torch import Precision as TorchPrecision

    tm, variables, x = _twins(act)
    tprec = TorchPrecision(policy)
    with tprec.autocast():
        ref = tprec.convert_output(tm(torch.from_numpy(x))).detach()
    prec = Precision(policy)
    ours = jax.jit(lambda v, x: prec.apply(ReadmeModel(act), v, x))(variables, jnp.asarray(x))
    assert str(ours.dtype) == str(ref.dtype).removeprefix("torch."), (ours.dtype, ref.dtype)
    a, b = np.asarray(ours, np.float32), ref.float().numpy()
    return float(np.mean(a == b))


@pytest.mark.parametrize("policy,least", [("bf16-mixed", 0.99), ("16-mixed", 0.98)])
def test_readme_flax_path_agrees_with_torch(policy, least):
    got = {act: readme_agreement(act, policy) for act in ACTS}
    print(f"\n{policy}, Precision.apply vs torch Precision.autocast, bitwise-equal outputs: "
          + ", ".join(f"{k} {v:.2%}" for k, v in got.items()))
    low = {k: v for k, v in got.items() if v < least}
    assert not low, low
