"""Fault paths behave the same in both backends (and as torch.amp.GradScaler / jmp do):
nonfinite=raise keeps the backed-off state, masters name the real parameter, clamps apply at
load after a strict=False resume, float64 gradients follow GradScaler's finiteness rule, and
`to_jmp()` / the pytree casts behave as jmp's own tests expect."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jmp = pytest.importorskip("jmp")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dualprec import (
    checkpoint,  # noqa: E402
    ref,  # noqa: E402
)
from dualprec.errors import NonFiniteGradientError  # noqa: E402
from dualprec_jax import Precision as JaxPrecision  # noqa: E402
from dualprec_jax import loss_scale as jls  # noqa: E402
from dualprec_torch import Precision as TorchPrecision  # noqa: E402


# ------------------------------------------------------------ nonfinite=raise, both backends
def _torch_raise_scales(policy, steps):
    prec = TorchPrecision(policy)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = prec.setup(model, opt)
    scales = []
    for _ in range(steps):
        opt.zero_grad()
        prec.backward(model(torch.ones(1, 2)).sum() * float("inf"))
        with pytest.raises(NonFiniteGradientError) as info:
            prec.step(opt)
        assert info.value.parameter in ("weight", "bias")
        prec.update()
        scales.append(prec.scale)
    return scales


def _jax_raise_scales(policy, steps):
    prec = JaxPrecision(policy)
    params = {"w": jnp.ones(2)}
    tx = prec.wrap_optimizer(optax.sgd(0.1))
    opt_state = tx.init(params)
    scales = []
    for _ in range(steps):
        grads = jax.grad(lambda p: prec.scale_loss(jnp.sum(p["w"]) * jnp.inf, opt_state.loss_scale))(params)
        with pytest.raises(NonFiniteGradientError) as info:
            prec.step(tx, grads, opt_state, params)
        assert info.value.parameter == "w"
        params, opt_state = info.value.params, info.value.opt_state  # the state after the skipped step
        scales.append(float(opt_state.loss_scale.scale))
    return scales


def test_nonfinite_raise_backs_off_the_same_in_both_backends():
    policy = "16-mixed,nonfinite=raise"
    expected = [65536.0 / 2 ** (i + 1) for i in range(3)]
    assert _torch_raise_scales(policy, 3) == expected
    assert _jax_raise_scales(policy, 3) == expected


# ------------------------------------------------------------- masters name the parameter
def test_torch_masters_name_the_real_parameter():
    prec = TorchPrecision("bf16-true,master=true,nonfinite=raise")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = prec.setup(model, opt)
    opt.zero_grad()
    out = model(torch.ones(1, 2, dtype=torch.bfloat16))
    (out.sum() + model[1].weight.sum() * float("nan")).backward()
    with pytest.raises(NonFiniteGradientError, match=r"gradient of 1\.weight") as info:
        prec.step(opt)
    assert info.value.parameter == "1.weight"


# --------------------------------------------------- clamps after a strict=False resume
@pytest.mark.parametrize("saved_scale, expected", [(2.0**20, 2.0**16), (2.0**-3, 1.0)])
def test_clamps_apply_at_load_in_both_backends(saved_scale, expected):
    policy = "16-mixed,loss_scale=dynamic(init=2**10,min=1,max=2**16,interval=4)"
    state = checkpoint.new_state("16-mixed,loss_scale=dynamic(init=2**10,interval=8)", saved_scale, 6)
    tprec = TorchPrecision(policy)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tprec.setup(model, opt)
    tprec.load_state_dict(state, strict=False)
    jprec = JaxPrecision(policy)
    tx = jprec.wrap_optimizer(optax.sgd(0.0))
    params = {"w": jnp.ones(2)}
    opt_state, _ = jprec.load_state_dict(state, tx.init(params), strict=False)
    assert tprec.scale == float(opt_state.loss_scale.scale) == expected
    assert tprec._scaler.counter == int(opt_state.loss_scale.counter) == 3  # cut to interval - 1
    # the next finite step grows in both (counter 3 + 1 == interval), clamped at max
    opt.zero_grad()
    tprec.backward(model(torch.ones(1, 2)).sum())
    tprec.step(opt)
    tprec.update()
    grads = jax.grad(lambda p: jprec.scale_loss(jnp.sum(p["w"]), opt_state.loss_scale))(params)
    params, opt_state = jprec.step(tx, grads, opt_state, params)
    assert tprec.scale == float(opt_state.loss_scale.scale) == min(expected * 2, 2.0**16)


# --------------------------------------------------- float64 gradients: GradScaler's rule
def test_float64_gradients_follow_grad_scaler():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale((p * torch.tensor([1e39, 3.0], dtype=torch.float64)).sum()).backward()
    scaled = p.grad.clone().numpy()
    scaler.unscale_(opt)
    theirs_finite = not bool(scaler._found_inf_per_device(opt)[torch.device("cpu")].item())
    theirs = p.grad.numpy()
    assert theirs_finite and theirs.dtype == np.float64 and theirs[0] == 1e39
    state = ref.LossScaleState(np.float32(2.0**16), 0)
    assert ref.all_finite([scaled]) == theirs_finite
    np.testing.assert_array_equal(ref.unscale([scaled], state)[0], theirs)
    with jax.enable_x64(True):
        g = jnp.asarray(scaled)
        assert g.dtype == jnp.float64 and bool(jls.all_finite([g])) == theirs_finite
        js = jls.LossScaleState(jnp.float32(2.0**16), jnp.int32(0))
        np.testing.assert_array_equal(np.asarray(jls.unscale([g], js)[0]), theirs)
    # dualprec_torch runs GradScaler's kernel: the same
    prec = TorchPrecision("64-true,loss_scale=dynamic")
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    o = torch.optim.SGD([q], lr=0.1)
    prec.setup(torch.nn.ParameterList([q]), o)
    prec.backward((q * torch.tensor([1e39, 3.0], dtype=torch.float64)).sum())
    assert prec.step(o) is True


# ------------------------------------------------------ jmp: to_jmp() and its own tests
HALF_DTYPES = (np.float16, jnp.float16, jnp.bfloat16)
FULL_DTYPES = (np.float32, jnp.float32)


@pytest.mark.parametrize("policy", ["bf16-mixed", "16-mixed", "32-true", "bf16-true", "16-true",
                                    "p=f32,c=bf16,o=f32"])
def test_to_jmp_gives_a_policy_jmp_can_print_and_use(policy):
    prec = JaxPrecision(policy)
    jp = prec.to_jmp()
    text = str(jp)  # jmp's __str__ looks the dtypes up in jmp.dtype_to_names
    assert jmp.get_policy(text) == jp
    assert str(jmp.get_policy(text)) == text
    tree = {"a": jnp.ones(2), "i": jnp.arange(2), "o": "text"}
    for cast in ("cast_to_param", "cast_to_compute", "cast_to_output"):
        ours, theirs = getattr(prec, cast)(tree), getattr(jp, cast)(tree)
        assert jax.tree.map(lambda x: getattr(x, "dtype", x), ours) == \
            jax.tree.map(lambda x: getattr(x, "dtype", x), theirs)


@pytest.mark.parametrize("dtype, np_", list(itertools.product(HALF_DTYPES + FULL_DTYPES, (np, jnp))))
def test_jmp_policy_casts_ported(dtype, np_):
    """jmp's test_policy_cast_to_{param,compute,output}, on our Precision."""
    name = {np.float16: "float16", jnp.float16: "float16", jnp.bfloat16: "bfloat16",
            np.float32: "float32", jnp.float32: "float32"}[dtype]
    prec = JaxPrecision(f"p={name},c={name},o={name}")
    tree = {"a": np_.ones([])}
    for cast in ("cast_to_param", "cast_to_compute", "cast_to_output"):
        assert getattr(prec, cast)(tree)["a"].dtype == jnp.dtype(dtype)


def test_jmp_cast_to_full_and_half_ported():
    """jmp's test_cast_to_full / test_cast_to_half: an object() leaf passes through."""
    half_tree = dict(o=object(), h=jnp.ones([], jnp.float16), f=jnp.ones([]), i=jnp.ones([], jnp.int16))
    full = JaxPrecision("32-true").cast_to_compute(half_tree)
    assert full["o"] is half_tree["o"] and full["h"].dtype == jnp.float32 and full["i"].dtype == jnp.int16
    assert jax.tree.map(lambda x: getattr(x, "dtype", x), full) == \
        jax.tree.map(lambda x: getattr(x, "dtype", x), jmp.cast_to_full(half_tree))
    half = JaxPrecision("16-true").cast_to_compute(half_tree)
    assert half["o"] is half_tree["o"] and half["f"].dtype == jnp.float16 and half["i"].dtype == jnp.int16


# ------------------------------------------- the scale at the edges: one range, three implementations
@pytest.mark.parametrize("policy, seq", [
    ("16-mixed,loss_scale=dynamic(init=2**-124,backoff=0.5)", [False] * 4 + [True] * 3),
    ("16-mixed,loss_scale=dynamic(init=2**124,interval=1)", [True] * 4 + [False] + [True] * 2),
    ("16-mixed,loss_scale=dynamic(init=2**-100,backoff=2**-24,interval=2)", [False] * 3 + [True] * 4),
])
def test_ref_torch_and_jax_agree_at_the_range_edges(policy, seq):
    from dualprec import Policy
    from dualprec_torch.loss_scale import LossScaler

    cfg = Policy.parse(policy).loss_scale
    r, j, t = ref.loss_scale_init(cfg), jls.loss_scale_init(cfg), LossScaler(cfg)
    ours = {"ref": [], "jax": [], "torch": []}
    for finite in seq:
        r = ref.loss_scale_update(r, finite, cfg)
        j = jax.jit(lambda s, f: jls.loss_scale_update(s, f, cfg))(j, finite)
        t.update([torch.tensor(0.0 if finite else 1.0)])
        ours["ref"].append(np.float32(r.scale).tobytes())
        ours["jax"].append(np.asarray(j.scale, np.float32).tobytes())
        ours["torch"].append(np.float32(t.scale).tobytes())
    assert ours["ref"] == ours["jax"] == ours["torch"]
    scales = [np.frombuffer(b, np.float32)[0] for b in ours["ref"]]
    assert min(scales) >= 2.0**-126 and max(scales) <= 2.0**126
    assert 2.0**-126 in scales or 2.0**126 in scales  # an edge was reached


def test_jax_unscale_at_the_largest_scale_keeps_the_gradients():
    state = jls.LossScaleState(jnp.float32(2.0**126), jnp.int32(0))
    g = np.array([2.0**126, 1.5 * 2.0**127, -(2.0**100)], np.float32)
    out = np.asarray(jax.jit(jls.unscale)([jnp.asarray(g)], state)[0])
    np.testing.assert_array_equal(out, g * np.float32(2.0**-126))  # nonzero: 1/scale is a normal float32
    r = ref.unscale([g], ref.LossScaleState(np.float32(2.0**126), 0))[0]
    np.testing.assert_array_equal(out, r)
