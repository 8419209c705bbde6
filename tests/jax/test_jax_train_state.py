"""Flax idioms: dualprec_jax.train_state.TrainState and nnx.Optimizer over the loss-scaled
optax wrapper (skipped steps, scale backoff, same numbers as the plain loop), and orbax /
precision-file checkpoints that resume bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dualprec import checkpoint
from dualprec.errors import CheckpointError, NonFiniteGradientError
from dualprec_jax import LossScaledOptState, Precision, last_step, scale_loss
from dualprec_jax.train_state import TrainState, restore_checkpoint, save_checkpoint
from tests.jax.conftest import assert_bitwise_equal

OVERFLOW_AT = 2  # the step whose gradients get an inf injected
POLICY = "16-mixed,loss_scale=dynamic(init=1024)"  # no overflow but the injected one
BACKED_OFF = 512.0


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="out")(nn.gelu(nn.Dense(8, name="hidden")(x)))


def _data(n=4):
    rng = np.random.default_rng(0)
    return [(jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), jnp.asarray(rng.standard_normal((8, 1)),
                                                                                 jnp.float32)) for _ in range(n)]


def _inject(grads, i):
    """An inf in the first leaf at OVERFLOW_AT (where a float16 backward would overflow)."""
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    leaves[0] = jnp.where(i == OVERFLOW_AT, jnp.inf, 1.0).astype(leaves[0].dtype) * leaves[0]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _setup(policy=POLICY):
    prec = Precision(policy)
    model = _MLP()
    variables = prec.init(model, jax.random.key(0), jnp.zeros((1, 4)))
    return prec, model, variables["params"]


def _loss(prec, model, params, x, y):
    out = prec.apply(model, {"params": params}, x)
    return jnp.mean((out.astype(jnp.float32) - y) ** 2)


def _train_state(prec, model, params, tx):
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, precision=prec)


def _make_step(prec, model):
    @jax.jit
    def step(state, x, y, i):
        grads = jax.grad(lambda p: scale_loss(_loss(prec, model, p, x, y), state.loss_scale))(state.params)
        return state.apply_gradients(grads=_inject(grads, i))
    return step


def _run(step, state, data, start=0):
    history = []
    for i, (x, y) in enumerate(data, start):
        state = step(state, x, y, i)
        history.append(state.params)
    return state, history


def test_train_state_skips_the_overflow_backs_off_and_equals_the_plain_loop():
    prec, model, params = _setup()
    state, history = _run(_make_step(prec, model), _train_state(prec, model, params, optax.adam(1e-2)), _data())
    assert isinstance(state.opt_state, LossScaledOptState)
    assert int(state.step) == 3  # four updates, one skipped
    assert float(state.loss_scale.scale) == BACKED_OFF  # backed off once
    assert int(state.opt_state.inner[0].count) == 3  # Adam's count skips the step too
    assert_bitwise_equal(history[OVERFLOW_AT], history[OVERFLOW_AT - 1])  # params untouched
    assert last_step(state).taken and prec.last_step(state).taken

    tx = prec.wrap_optimizer(optax.adam(1e-2))  # the same steps written out with the wrapper

    @jax.jit
    def plain_step(p, opt_state, x, y, i):
        grads = jax.grad(lambda q: prec.scale_loss(_loss(prec, model, q, x, y), opt_state.loss_scale))(p)
        return prec.step(tx, _inject(grads, i), opt_state, p)

    p, opt_state = params, tx.init(params)
    for i, (x, y) in enumerate(_data()):
        p, opt_state = plain_step(p, opt_state, x, y, i)
    assert_bitwise_equal((state.params, state.opt_state), (p, opt_state))


def test_master_weights_and_nonfinite_raise():
    prec, model, params = _setup("params=float16,compute=float16,output=float32,loss_scale=dynamic(init=1024),"
                                 "master=true,nonfinite=raise")
    state = _train_state(prec, model, params, optax.sgd(0.1))
    assert state.opt_state.master["hidden"]["kernel"].dtype == jnp.float32
    step = _make_step(prec, model)
    state = step(state, *_data(1)[0], 0).check_step()
    assert state.params["hidden"]["kernel"].dtype == jnp.float16
    assert_bitwise_equal(state.params, jax.tree.map(lambda m: m.astype(jnp.float16), state.opt_state.master))
    skipped = step(state, *_data(1)[0], OVERFLOW_AT)
    with pytest.raises(NonFiniteGradientError, match="hidden"):
        skipped.check_step()


def test_orbax_precision_items_carry_the_master_weights(tmp_path):
    prec, model, params = _setup("params=bfloat16,compute=bfloat16,output=float32,master=true")
    state = _make_step(prec, model)(_train_state(prec, model, params, optax.sgd(0.1)), *_data(1)[0], 0)
    save_checkpoint(tmp_path / "ckpt", state)
    fresh = _train_state(prec, model, params, optax.sgd(0.1))
    only = restore_checkpoint(tmp_path / "ckpt", fresh, precision_only=True)
    assert_bitwise_equal(only.opt_state.master, state.opt_state.master)  # float32, not the bf16 params
    assert not jax.tree_util.tree_all(jax.tree.map(jnp.array_equal, only.opt_state.master, fresh.opt_state.master))


def test_create_needs_a_precision_and_a_plain_optimizer():
    prec, model, params = _setup()
    with pytest.raises(TypeError, match="precision"):
        TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), precision=None)
    with pytest.raises(TypeError, match="optax"):
        TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd, precision=prec)


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.hidden(x)))


def test_nnx_optimizer_with_the_loss_scaled_wrapper_equals_the_functional_loop():
    prec = Precision(POLICY)
    model = prec.setup(_NnxMLP(nnx.Rngs(0)))
    graphdef, params0 = nnx.split(model, nnx.Param)
    params0 = jax.tree.map(jnp.copy, params0)
    optimizer = nnx.Optimizer(model, prec.wrap_optimizer(optax.adam(1e-2)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y, i):
        def loss_fn(m):
            loss = jnp.mean((m(x).astype(jnp.float32) - y) ** 2)
            return scale_loss(loss, optimizer.opt_state.loss_scale)

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, _inject(grads, i))

    for i, (x, y) in enumerate(_data()):
        train_step(model, optimizer, x, y, i)
    assert float(last_step(optimizer).scale) == BACKED_OFF
    assert last_step(optimizer).taken and prec.last_step(optimizer).taken

    tx = prec.wrap_optimizer(optax.adam(1e-2))  # the same steps on the pure pytree

    @jax.jit
    def plain_step(p, opt_state, x, y, i):
        def loss_fn(q):
            out = nnx.merge(graphdef, q)(x)
            return prec.scale_loss(jnp.mean((out.astype(jnp.float32) - y) ** 2), opt_state.loss_scale)
        return prec.step(tx, _inject(jax.grad(loss_fn)(p), i), opt_state, p)

    p, opt_state = params0, tx.init(params0)
    for i, (x, y) in enumerate(_data()):
        p, opt_state = plain_step(p, opt_state, x, y, i)
    assert_bitwise_equal(nnx.state(model, nnx.Param), p)
    assert int(opt_state.loss_scale.counter) == int(optimizer.opt_state.loss_scale.counter.get_value()) == 1


def test_orbax_checkpoint_resumes_bit_for_bit(tmp_path):
    prec, model, params = _setup()
    step = _make_step(prec, model)
    data = _data()
    state, _ = _run(step, _train_state(prec, model, params, optax.adam(1e-2)), data[:3])  # skip included
    save_checkpoint(tmp_path / "ckpt", state)
    straight, _ = _run(step, state, data[3:], start=3)

    fresh = _train_state(prec, model, params, optax.adam(1e-2))
    restored = restore_checkpoint(tmp_path / "ckpt", fresh)
    assert float(restored.loss_scale.scale) == BACKED_OFF and int(restored.step) == 2
    assert isinstance(restored.opt_state, LossScaledOptState)
    resumed, _ = _run(step, restored, data[3:], start=3)
    assert_bitwise_equal((resumed.params, resumed.opt_state, resumed.step),
                         (straight.params, straight.opt_state, straight.step))

    only = restore_checkpoint(tmp_path / "ckpt", fresh, precision_only=True)  # the precision items alone
    assert float(only.loss_scale.scale) == BACKED_OFF and int(only.opt_state.loss_scale.counter) == 0
    assert_bitwise_equal(only.params, fresh.params)
    with pytest.raises(CheckpointError, match="bf16-mixed"):
        restore_checkpoint(tmp_path / "ckpt", _train_state(Precision("bf16-mixed"), model, params, optax.adam(1e-2)))


def test_the_precision_checkpoint_file_round_trips_the_train_state(tmp_path):
    prec, model, params = _setup()
    step = _make_step(prec, model)
    data = _data()
    state, _ = _run(step, _train_state(prec, model, params, optax.sgd(0.1)), data[:3])
    checkpoint.save_state(tmp_path / "precision.safetensors", state.precision_state_dict())
    header, tensors = checkpoint.load(tmp_path / "precision.safetensors")
    assert header["policy"] == str(prec.policy) and float(tensors["loss_scale.scale"]) == BACKED_OFF

    fresh = _train_state(prec, model, state.params, optax.sgd(0.1)).replace(step=state.step)
    resumed = fresh.load_precision_state_dict(checkpoint.load_state(tmp_path / "precision.safetensors"))
    assert_bitwise_equal(resumed.opt_state.loss_scale, state.opt_state.loss_scale)
    a, _ = _run(step, resumed, data[3:], start=3)
    b, _ = _run(step, state, data[3:], start=3)
    assert_bitwise_equal((a.params, a.opt_state, a.step), (b.params, b.opt_state, b.step))


def test_the_loss_scale_crosses_to_and_from_torch_through_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    from dualprec_torch import Precision as TorchPrecision

    prec, model, params = _setup()
    state, _ = _run(_make_step(prec, model), _train_state(prec, model, params, optax.sgd(0.1)), _data())
    checkpoint.save_state(tmp_path / "jax.safetensors", state.precision_state_dict())
    torch_prec = TorchPrecision(POLICY, device="cpu")
    torch_prec.setup(torch.nn.Sequential(torch.nn.Linear(4, 1)))
    torch_prec.load_state_dict(checkpoint.load_state(tmp_path / "jax.safetensors"))
    assert torch_prec.state_dict()["loss_scale"] == {"scale": BACKED_OFF, "counter": 1}

    checkpoint.save_state(tmp_path / "torch.safetensors", torch_prec.state_dict())
    back = _train_state(prec, model, params, optax.sgd(0.1)).load_precision_state_dict(
        checkpoint.load_state(tmp_path / "torch.safetensors"))
    assert float(back.loss_scale.scale) == BACKED_OFF and int(back.opt_state.loss_scale.counter) == 1


def test_the_snippets_of_docs_flax_md_run(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "flax.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile("\n".join(blocks), "docs/flax.md", "exec"), namespace)  # in order, as a reader would
    state = namespace["state"]
    assert last_step(state).outcome == "skipped" and float(state.loss_scale.scale) == 2.0 ** 15  # as the page says
    assert int(namespace["restored"].step) == int(state.step) == 0
    assert float(namespace["restored"].loss_scale.scale) == float(namespace["again"].loss_scale.scale) == 2.0 ** 15
