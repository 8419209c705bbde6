"""One training checkpoint resumes in the other framework: the README model with AdamW under
16-mixed, overflows injected before and after the checkpoint at step 5.  The loss-scale
trajectory (scale bits, counter, skipped) equals the uninterrupted run's in the resuming
framework bit for bit; losses and parameters agree within a bound of float16 matmul
rounding carried through 5 AdamW steps (the two frameworks' float16 GEMMs round differently)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import flax.linen as fnn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dualprec import checkpoint  # noqa: E402
from dualprec.errors import CheckpointError  # noqa: E402
from dualprec_jax import Precision as JaxPrecision  # noqa: E402
from dualprec_jax import checkpoint as jck  # noqa: E402
from dualprec_torch import Precision as TorchPrecision  # noqa: E402
from dualprec_torch import checkpoint as tck  # noqa: E402

POLICY = "16-mixed,loss_scale=dynamic(interval=2)"  # grows every 2 finite steps: both moves in 10 steps
STEPS, SPLIT, OVERFLOWS = 10, 5, (2, 7)
LR = 1e-2
NAMES = {"Dense_0": "0", "LayerNorm_0": "2", "Dense_1": "3"}  # Flax module -> torch module
rng = np.random.default_rng(0)
X = rng.standard_normal((STEPS, 32, 16)).astype(np.float32)
Y = rng.standard_normal((STEPS, 32, 4)).astype(np.float32)


class FlaxMLP(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.gelu(fnn.Dense(64)(x), approximate=False)
        return fnn.Dense(4)(fnn.LayerNorm(epsilon=1e-5)(h))


def _torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 4))


class TorchRun:
    def __init__(self):
        self.prec = TorchPrecision(POLICY)
        self.model = _torch_model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.model, self.opt = self.prec.setup(self.model, self.opt)

    def step(self, i):
        self.opt.zero_grad()
        with self.prec.autocast():
            out = self.prec.convert_output(self.model(self.prec.convert_input(torch.from_numpy(X[i]))))
            loss = torch.nn.functional.mse_loss(out, torch.from_numpy(Y[i]))
        self.prec.backward(loss * (float("inf") if i in OVERFLOWS else 1.0))
        self.prec.step(self.opt)
        self.prec.update()
        return float(loss.detach()), np.float32(self.prec.scale), self.prec._scaler.counter

    def params(self):
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}

    def save(self, path):
        tck.save_training(path, self.model, self.opt, self.prec)

    def load(self, path):
        tck.load_training(path, self.model, self.opt, self.prec)


_JAX = {}


def _jax_parts():
    """One Precision, optimizer and jitted step for every JaxRun (compiled once)."""
    if not _JAX:
        prec = JaxPrecision(POLICY)
        tx = prec.wrap_optimizer(optax.adamw(LR, weight_decay=1e-2))  # torch AdamW's defaults

        @jax.jit
        def train_step(params, opt_state, x, y, mult):
            def loss_fn(p):
                loss = jnp.mean((prec.apply(FlaxMLP(), {"params": p}, x) - y) ** 2)
                return prec.scale_loss(loss * mult, opt_state.loss_scale), loss
            grads, loss = jax.grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        _JAX.update(prec=prec, tx=tx, step=train_step)
    return _JAX["prec"], _JAX["tx"], _JAX["step"]


class JaxRun:
    def __init__(self):
        self.prec, self.tx, self._step = _jax_parts()
        shapes = self.prec.init(FlaxMLP(), jax.random.key(0), jnp.ones((1, 16)))["params"]
        rules = jck.torch_names(shapes, NAMES)
        torch_init = {n: p.detach().numpy() for n, p in _torch_model().named_parameters()}
        self.params = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(jck._to_flax(torch_init[rules[tuple(jck._key(k) for k in path)][0]],
                                                     rules[tuple(jck._key(k) for k in path)][1], x)), shapes)
        self.opt_state = self.tx.init(self.params)

    def step(self, i):
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, X[i], Y[i],
                                                       np.float32(np.inf if i in OVERFLOWS else 1.0))
        ls = self.opt_state.loss_scale
        return float(loss), np.float32(ls.scale), int(ls.counter)

    def params_torch(self):
        return {jck.torch_names(self.params, NAMES)[p][0]: jck._to_torch(x, jck.torch_names(self.params, NAMES)[p][1])
                for p, x in jck._leaves_with_paths(self.params)}

    def save(self, path):
        jck.save_training(path, self.params, self.opt_state, self.prec, names=NAMES)

    def load(self, path):
        self.params, self.opt_state = jck.load_training(path, self.params, self.opt_state, self.prec, names=NAMES)


RUNS = {"torch": TorchRun, "jax": JaxRun}


def _params(run):
    return run.params() if isinstance(run, TorchRun) else run.params_torch()


@pytest.fixture(scope="module")
def straight():
    out = {}
    for name, cls in RUNS.items():
        run = cls()
        out[name] = ([run.step(i) for i in range(STEPS)], _params(run))
    return out


def _bound(a, b):
    return float(np.max(np.abs(a - b) / (np.abs(b) + 1e-2)))


def test_the_uninterrupted_runs_agree(straight):
    (t_traj, t_params), (j_traj, j_params) = straight["torch"], straight["jax"]
    assert [(s, c) for _, s, c in t_traj] == [(s, c) for _, s, c in j_traj]
    assert len({s for _, s, _ in t_traj}) >= 3  # grew and backed off
    np.testing.assert_allclose([loss for loss, _, _ in t_traj], [loss for loss, _, _ in j_traj], rtol=5e-3)
    for n in t_params:
        assert _bound(j_params[n], t_params[n]) < 1e-2, n


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("torch", "jax"), ("jax", "torch")])
def test_adamw_run_resumes_in_the_other_framework(straight, first, second, tmp_path):
    before = RUNS[first]()
    traj = [before.step(i) for i in range(SPLIT)]
    path = tmp_path / "train.safetensors"
    before.save(path)
    after = RUNS[second]()
    after.load(path)
    traj += [after.step(i) for i in range(SPLIT, STEPS)]
    expected, params = straight[second]
    # the loss-scale trajectory: float32 scale bits and counters, step for step
    assert [(s.tobytes(), c) for _, s, c in traj] == [(s.tobytes(), c) for _, s, c in expected]
    np.testing.assert_allclose([loss for loss, _, _ in traj], [loss for loss, _, _ in expected], rtol=1e-3)
    got = _params(after)
    worst = max(_bound(got[n], params[n]) for n in params)
    assert worst < 1e-2, worst  # measured 3.96e-3 both ways (the straight runs differ by 3.92e-3)
    # the moments matter: dropping them (a fresh AdamW after the checkpoint) misses by far more
    fresh = RUNS[second]()
    fresh.load(path)
    if second == "torch":
        fresh.opt.state.clear()
    else:
        fresh.opt_state = fresh.opt_state._replace(inner=fresh.tx.init(fresh.params).inner)
    for i in range(SPLIT, STEPS):
        fresh.step(i)
    assert max(_bound(_params(fresh)[n], params[n]) for n in params) > 5 * worst


def test_unmappable_optimizers_are_refused(tmp_path):
    run = TorchRun()
    rms = torch.optim.RMSprop(run.model.parameters())
    with pytest.raises(CheckpointError, match="RMSprop has no mapping"):
        tck.save_training(tmp_path / "x.safetensors", run.model, rms, run.prec)
    jrun = JaxRun()
    tx = jrun.prec.wrap_optimizer(optax.rmsprop(1e-3))
    with pytest.raises(CheckpointError, match="ScaleByRmsState has no mapping"):
        jck.save_training(tmp_path / "x.safetensors", jrun.params, tx.init(jrun.params), jrun.prec, names=NAMES)


def test_a_checkpoint_needs_matching_names(tmp_path):
    run = TorchRun()
    run.step(0)
    run.save(tmp_path / "t.safetensors")
    jrun = JaxRun()
    with pytest.raises(CheckpointError, match="names="):
        jck.load_training(tmp_path / "t.safetensors", jrun.params, jrun.opt_state, jrun.prec)  # no names map
    assert checkpoint.load_training_file(tmp_path / "t.safetensors")["optimizer"]["step"] == 1


def test_torch_precision_state_of_a_quantized_model_loads_with_weights_only(tmp_path):
    pytest.importorskip("bitsandbytes")
    prec = TorchPrecision("bf16-mixed,quant=nf4")
    torch.manual_seed(0)
    model = prec.setup(torch.nn.Sequential(torch.nn.Linear(64, 8)))
    state = prec.state_dict()
    assert state["extensions"]["quant"] and all(isinstance(v, torch.Tensor)
                                                for v in state["extensions"]["quant"].values())
    torch.save(state, tmp_path / "p.pt")
    back = torch.load(tmp_path / "p.pt", weights_only=True)  # torch's default: no pickle of NumPy arrays
    fresh = TorchPrecision("bf16-mixed,quant=nf4")
    other = fresh.setup(torch.nn.Sequential(torch.nn.Linear(64, 8)))
    fresh.load_state_dict(back)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("first", ["torch", "jax"])
def test_master_weights_cross_in_a_training_checkpoint(first, tmp_path):
    """bf16 params with float32 masters: the masters travel by torch name and layout."""
    policy = "bf16-true,master=true"
    torch.manual_seed(0)
    tmodel = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    tprec = TorchPrecision(policy)
    with torch.no_grad():
        init = {n: p.detach().clone() for n, p in tmodel.named_parameters()}
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-2)
    tmodel, topt = tprec.setup(tmodel, topt)

    class Two(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.Dense(8)(x)  # Dense_0 (named in call order)
            return fnn.Dense(4)(h)

    names = {"Dense_0": "0", "Dense_1": "1"}
    jprec = JaxPrecision(policy)
    shapes = jprec.init(Two(), jax.random.key(0), jnp.ones((1, 16)))["params"]
    rules = jck.torch_names(shapes, names)
    jparams = jax.tree_util.tree_map_with_path(
        lambda path, x: jck._to_flax(init[rules[tuple(jck._key(k) for k in path)][0]].float().numpy(),
                                     rules[tuple(jck._key(k) for k in path)][1], x), shapes)
    tx = jprec.wrap_optimizer(optax.adamw(1e-2, weight_decay=1e-2))
    jstate = tx.init(jparams)
    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    if first == "torch":
        for _ in range(3):
            topt.zero_grad()
            tprec.backward(tmodel(torch.from_numpy(x).bfloat16()).float().pow(2).mean())
            tprec.step(topt)
        tck.save_training(path, tmodel, topt, tprec)
        jparams, jstate = jck.load_training(path, jparams, jstate, jprec, names=names)
    else:
        for _ in range(3):
            grads = jax.grad(lambda p: jnp.mean(jprec.apply(Two(), {"params": p}, x).astype(jnp.float32) ** 2))(jparams)
            jparams, jstate = jprec.step(tx, grads, jstate, jparams)
        jck.save_training(path, jparams, jstate, jprec, names=names)
        tck.load_training(path, tmodel, topt, tprec)
    tmasters = {n: m for n, m in zip([n for n, _ in tmodel.named_parameters()],
                                     [m for _, m in next(iter(tprec._records.values())).masters.pairs])}
    jmasters = {rules[p][0]: jck._to_torch(v, rules[p][1]) for p, v in jck._leaves_with_paths(jstate.master)}
    assert set(tmasters) == set(jmasters) == set(init)
    for n in init:
        np.testing.assert_array_equal(tmasters[n].detach().numpy(), jmasters[n], err_msg=n)
        assert not np.array_equal(jmasters[n], init[n].float().numpy()), n  # they trained
    tstep = {int(topt.state[p]["step"]) for g in topt.param_groups for p in g["params"]}
    adam = [s for s in jck._states(jstate.inner) if isinstance(s, optax.ScaleByAdamState)][0]
    assert tstep == {int(adam.count)} == {3}


@pytest.mark.slow
@pytest.mark.parametrize("first", ["torch", "jax"])
def test_fp8_state_crosses_in_a_training_checkpoint(first, tmp_path):
    """Delayed-scaling FP8 state (scales, amax histories) travels under torch module names."""
    from dualprec_jax import fp8 as jfp8
    from dualprec_torch import fp8 as tfp8

    policy = "bf16-mixed,fp8=delayed(history=4)"
    torch.manual_seed(0)
    tprec = TorchPrecision(policy)
    tmodel = torch.nn.Sequential(torch.nn.Linear(32, 16))
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
    tmodel, topt = tprec.setup(tmodel, topt)

    class One(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(16)(x)

    names = {"Dense_0": "0"}
    jprec = JaxPrecision(policy)
    x = np.random.default_rng(2).standard_normal((16, 32)).astype(np.float32)
    variables = jprec.init(One(), jax.random.key(0), x)
    params = variables["params"]
    tx = jprec.wrap_optimizer(optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    path = tmp_path / "f.safetensors"
    if first == "torch":
        for _ in range(3):
            topt.zero_grad()
            with tprec.autocast():
                loss = tprec.convert_output(tmodel(torch.from_numpy(x))).float().pow(2).mean()
            tprec.backward(loss)
            tprec.step(topt)
        tck.save_training(path, tmodel, topt, tprec)
        params, opt_state, variables = jck.load_training(path, params, opt_state, jprec, variables=variables,
                                                         names=names)
    else:
        for _ in range(3):
            grads = jax.grad(lambda v: jnp.mean(jprec.apply(One(), v, x).astype(jnp.float32) ** 2))(
                {**variables, "params": params})
            params, opt_state = jprec.step(tx, grads["params"], opt_state, params)
            variables = jfp8.apply_fp8_grads({**variables, "params": params}, grads)
        jck.save_training(path, params, opt_state, jprec, variables=variables, names=names)
        tck.load_training(path, tmodel, topt, tprec)
    theirs = {k.replace("fp8.Dense_0.", "fp8.0."): v for k, v in jfp8.state_tensors(variables).items()}
    ours = {k: v.numpy() for k, v in tfp8.state_tensors(tmodel).items()}
    assert set(ours) == set(theirs) and len(ours) == 6
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert any(np.any(v != 0) for k, v in ours.items() if k.endswith("amax_history"))  # they trained


@pytest.mark.parametrize("make", [
    lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    lambda: optax.adamw(optax.linear_schedule(1e-3, 0.0, 10)),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
], ids=["inject_hyperparams", "schedule", "chain", "nesterov"])
def test_common_optax_wrappings_round_trip(make, tmp_path):
    """Counts of schedules and inject_hyperparams follow the Adam step; a chain's other
    stateless parts are left as they are."""
    prec = JaxPrecision("16-mixed")
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    tx = prec.wrap_optimizer(make())
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):
        params, state = prec.step(tx, jax.tree.map(lambda g: g * 65536.0, grads), state, params)
    jck.save_training(tmp_path / "o.safetensors", params, state, prec)
    _, back = jck.load_training(tmp_path / "o.safetensors", params, tx.init(params), prec)
    leaves, again = jax.tree.leaves(state.inner), jax.tree.leaves(back.inner)
    assert len(leaves) == len(again) and all(np.array_equal(a, b) for a, b in zip(leaves, again))
    assert any(np.any(np.asarray(a) != 0) for a in leaves)
