"""Where a per-module override starts, both backends cast the module's floating inputs to the
override's compute dtype and its outputs to the override's output dtype
(`dualprec_torch.modules` around the forward; the linen interceptor in JAX)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dualprec_jax import Precision as JPrecision
from dualprec_torch import Precision as TPrecision


class _Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="fc1")(x)
        self.sow("intermediates", "fc1_out", h)
        return nn.Dense(4, name="fc2")(h * 3.0)  # a hand-written op on the boundary's output


def _torch_model():
    m = torch.nn.Sequential()
    m.add_module("fc1", torch.nn.Linear(8, 8))
    m.add_module("fc2", torch.nn.Linear(8, 4))
    return m


@pytest.mark.parametrize("policy", ["32-true,@fc1=bf16-mixed", "32-true,@fc1=16-true",
                                    "bf16-mixed,@fc1=32-true", "bf16-mixed,@fc1=bf16-true"])
def test_override_root_output_dtype_is_the_same_in_both_backends(policy):
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    jp = JPrecision(policy)
    v = jp.init(_Flax(), jax.random.PRNGKey(0), jnp.asarray(x))
    _, state = jp.apply(_Flax(), v, jnp.asarray(x), mutable=["intermediates"])
    j_dtype = str(state["intermediates"]["fc1_out"][0].dtype)

    tp = TPrecision(policy)
    model = tp.setup(_torch_model())
    seen = {}

    def record(mod, inputs, output):
        seen["fc1"] = output.dtype

    model.fc1.register_forward_hook(record)
    with tp.autocast():
        model(tp.convert_input(torch.from_numpy(x)))
    want = jp.policy.for_module("fc1").output_dtype
    assert j_dtype == want
    assert str(seen["fc1"]).removeprefix("torch.") == want


def test_scatter_with_a_literal_index_runs_under_precision_apply():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            gain = jnp.ones(x.shape[-1]).at[0].set(2.0)  # literal index and update in the jaxpr
            return nn.Dense(4)(x * gain)

    prec = JPrecision("bf16-mixed")
    x = jnp.ones((2, 8))
    v = prec.init(M(), jax.random.PRNGKey(0), x)
    y = prec.apply(M(), v, x)
    assert y.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(y)))
