"""Fuzzing the parser: every input is parsed or refused with a one-line PolicyError (never
OverflowError, ZeroDivisionError, RecursionError, ValueError from int(), ...), and accepted
values at the edges of their ranges train 3 steps in both backends without a NaN."""

import random

import numpy as np
import pytest

from dualprec import Policy, PolicyError
from dualprec.errors import MAX_MESSAGE

#: the inputs the issue listed, and their neighbours
LISTED = [
    "16-mixed,loss_scale=2**1024", "16-mixed,loss_scale=0**-1", "16-mixed,loss_scale=dynamic(init=2**1024)",
    "16-mixed,loss_scale=dynamic(init=0**-1)",
    "16-mixed,loss_scale=" + "9" * 5000, "16-mixed,loss_scale=dynamic(interval=" + "9" * 60 + ")",
    "16-mixed,loss_scale=1" + "0" * 400, "16-mixed,loss_scale=dynamic(init=1e400)",
    "float8_from_" * 20 + "mixed_bfloat16", "float8_from_" * 400 + "mixed_bfloat16",
    "int8_from_float8_from_mixed_bfloat16", "٣٢", "²", "16-mixed,loss_scale=static(٣٢)",
    "16-mixed,loss_scale=²", "16-mixed,loss_scale=2**٣", "\x1b[31mbf16\x1b[0m",
    "x" * 10_000_000, "bf16-mixed,@" + "h" * 100_000 + "=32-true", "(" * 3000 + ")" * 3000,
    "bf16-mixed,fp8=delayed(margin=200)", "16-mixed,loss_scale=dynamic(init=1e-46)",
    "16-mixed,loss_scale=dynamic(init=1e39)", "16-mixed,loss_scale=dynamic(interval=3e9)",
    "16-mixed,loss_scale=dynamic(backoff=1e-300)", "16-mixed,loss_scale=dynamic(growth=1e300)",
    "bf16-mixed,quant=int8(threshold=1e39)", "bf16-mixed,fp8=delayed(history=2**40)",
    "bf16-mixed,@head=p=f32,c=f32", "16-mixed,loss_scale=dynamic(min=1e-46)",
    "16-mixed,loss_scale=dynamic(max=1e39)", "16-mixed,loss_scale=static(nan)", "16-mixed,loss_scale=inf",
    "16-mixed,loss_scale=dynamic(init=-0.0)", "\ud800", "bf16-mixed,\x00", "p=f32,c=\u200bbf16",
]

SEEDS = ["16-mixed", "bf16-mixed,quant=nf4-dq(skip=head)", "16-mixed,loss_scale=dynamic(init=2**10,growth=2,"
         "backoff=0.5,interval=100,min=1,max=2**20)", "bf16-mixed,fp8=delayed(history=16,margin=1,algo=max)",
         "p=f32,c=bf16,o=f32,@head=(c=f32),@emb=32-true", "float8_from_mixed_bfloat16",
         "16-mixed,loss_scale=static(2**4),nonfinite=raise", "bf16-true,master=true,quant=int8(threshold=6)"]
ALPHABET = list("=,()@*^.+-eE0123456789 \t\n") + ["**", "**-", "1e", "2**", "٣", "²", "\x1b", "\u00e9", ","]


def _mutants(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = list(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 2)):
            op, i = rng.random(), rng.randrange(len(s) + 1)
            if op < 0.4:
                s.insert(i, rng.choice(ALPHABET))
            elif op < 0.7 and s:
                del s[min(i, len(s) - 1)]
            elif s:
                s[min(i, len(s) - 1)] = rng.choice(ALPHABET)
        out.append("".join(s))
    return out


def _check_one(text) -> str:
    try:
        Policy.parse(text)
        return "accepted"
    except PolicyError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg, repr(msg[:200])
        assert len(msg) <= 2 * MAX_MESSAGE + 100, len(msg)
        return "refused"


def test_listed_inputs_are_parsed_or_refused_with_one_line():
    results = {t[:40]: _check_one(t) for t in LISTED}
    # each of these must be refused: they break training, overflow, or are ambiguous
    assert all(r == "refused" for r in results.values()), [k for k, r in results.items() if r != "refused"]
    # whitespace around tokens is ignored, and 0**0 is 1
    assert Policy.parse("bf16-mixed\n,fp8=delayed") == Policy.parse("bf16-mixed,fp8=delayed")
    assert Policy.parse("16-mixed,loss_scale=dynamic(init=0**0)").loss_scale.init_scale == 1.0


def test_mutated_policy_strings_raise_only_policy_error():
    inputs = _mutants(3000)
    outcomes = [_check_one(t) for t in inputs]
    assert outcomes.count("refused") > 1000 and outcomes.count("accepted") > 100  # both paths exercised


def test_json_documents_raise_only_policy_error():
    docs = ['{"policy": "bf16-mixed", "policy": "32-true"}', '{"schema_version": 1, "schema_version": 1}',
            "[" * 100_000 + "]" * 100_000, '{"schema_version": 1, "loss_scale": {"kind": "dynamic", '
            '"init_scale": 1e999}}', '{"schema_version": 1, "loss_scale": {"kind": "dynamic", "growth_interval": '
            '1e30}}', '{"schema_version": 1, "fp8": {"margin": 1e308}}', '{"policy": "\\u001b[2J"}']
    for d in docs:
        with pytest.raises(PolicyError) as info:
            Policy.from_json(d)
        assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    with pytest.raises(PolicyError, match='"policy" appears twice'):
        Policy.from_json(docs[0])


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(ALPHABET + ["bf16", "16-mixed", "p", "c", "loss_scale", "dynamic", "static",
                                             "init", "fp8", "delayed", "margin", "quant", "nf4", "f32",
                                             "float8_from_", "int8_from_"]), max_size=25).map("".join))
def test_random_text_raises_only_policy_error(text):
    _check_one(text)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from(["init", "growth", "backoff", "interval", "min", "max"]),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70)))
def test_any_loss_scale_number_is_in_range_or_refused(arg, value):
    text = f"16-mixed,loss_scale=dynamic({arg}={value!r})"
    if _check_one(text) == "accepted":
        ls = Policy.parse(text).loss_scale
        for x in (ls.init_scale, ls.min_scale or 1.0, ls.max_scale or 1.0):
            assert 2.0**-126 <= float(np.float32(x)) <= 2.0**126
        assert 1 <= ls.growth_interval < 2**31 and 2.0**-24 <= ls.backoff_factor < 1 < ls.growth_factor


# ------------------------------------------------- accepted edges train without NaN
EDGES = [
    "16-mixed,loss_scale=dynamic(init=2**-126,backoff=2**-24,interval=1)",  # the smallest scale and backoff
    "16-mixed,loss_scale=dynamic(init=2**126,growth=2**126,interval=1)",  # the largest scale and growth
    "16-mixed,loss_scale=dynamic(interval=2147483647,min=2**-126,max=2**126)", "16-mixed,loss_scale=static(2**126)",
    "bf16-mixed,fp8=delayed(margin=32,history=1)", "bf16-mixed,fp8=delayed(history=65536,algo=most_recent)",
]


def _torch_losses(policy):
    torch = pytest.importorskip("torch")
    from dualprec_torch import Precision

    torch.manual_seed(0)
    prec = Precision(policy)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = prec.setup(model, opt)
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    out = []
    for _ in range(3):
        opt.zero_grad()
        with prec.autocast():
            loss = torch.nn.functional.mse_loss(prec.convert_output(model(prec.convert_input(x))), y)
        prec.backward(loss)
        prec.step(opt)
        prec.update()
        out.append(float(loss.detach()))
    params = np.concatenate([p.detach().float().numpy().ravel() for p in model.parameters()])
    return out, params


def _jax_losses(policy):
    jax = pytest.importorskip("jax")
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    from dualprec_jax import Precision

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.gelu(nn.Dense(16)(x)))

    from dualprec_jax import fp8

    prec = Precision(policy)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    y = jax.random.normal(jax.random.key(2), (4, 2))
    variables = prec.init(MLP(), jax.random.key(0), x)  # params, and FP8 state under delayed scaling
    params = variables["params"]
    tx = prec.wrap_optimizer(optax.adamw(1e-2))
    opt_state = tx.init(params)
    @jax.jit
    def train_step(variables, params, opt_state):
        def loss_fn(v):
            loss = jnp.mean((prec.apply(MLP(), v, x) - y) ** 2)
            return prec.scale_loss(loss, opt_state.loss_scale), loss
        grads, loss = jax.grad(loss_fn, has_aux=True)({**variables, "params": params})
        params, opt_state = prec.step(tx, grads["params"], opt_state, params)
        variables = fp8.apply_fp8_grads({**variables, "params": params}, grads) if len(variables) > 1 else variables
        return variables, params, opt_state, loss

    out = []
    for _ in range(3):
        variables, params, opt_state, loss = train_step(variables, params, opt_state)
        out.append(float(loss))
    leaves = jax.tree.leaves({**variables, "params": params})
    return out, np.concatenate([np.asarray(v, np.float32).ravel() for v in leaves])


@pytest.mark.slow
@pytest.mark.parametrize("policy", EDGES)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_accepted_edge_values_train_three_steps_without_nan(backend, policy):
    losses, params = (_torch_losses if backend == "torch" else _jax_losses)(policy)
    assert np.isfinite(losses).all(), losses
    assert np.isfinite(params).all()


@pytest.mark.parametrize("text", ["٣٢", "²", "16\n\x1b[2Jmixed", "x" * 100_000])
def test_cli_refuses_non_ascii_digits_with_one_line(text, capsys):
    from dualprec import cli

    assert cli.main(["explain", text]) == 2  # a PolicyError, not 32-true nor a ValueError
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and len(err) < 2 * MAX_MESSAGE


def test_policy_dicts_raise_only_policy_error():
    """Random dicts (as JSON/TOML files give them) with wrong types and out-of-range values."""
    rng = random.Random(0)
    values = [None, True, False, 0, 1, -1, 2**31, 10**400, 1.5, float("nan"), float("inf"), -0.0, 1e-46, 1e39, "",
              "abc", "bf16", "f32", "dynamic", "nf4", "delayed", [], [1], ["x"], {}, {"a": 1}, "٣", "2**1024",
              "\x1b", 5**0.5]
    keys = {"param_dtype": None, "compute_dtype": None, "output_dtype": None, "reduce_dtype": None,
            "loss_scale": ["kind", "init_scale", "growth_factor", "backoff_factor", "growth_interval", "min_scale",
                           "max_scale"],
            "quantization": ["mode", "blocksize", "threshold", "skip"],
            "fp8": ["scaling", "history_len", "margin", "amax_algo", "format", "engine"],
            "master_weights": None, "nonfinite": None, "overrides": None, "schema_version": None}
    refused = 0
    for _ in range(3000):
        d = {"schema_version": 1}
        for k in rng.sample(list(keys), rng.randint(1, 4)):
            sub = keys[k]
            if sub is None:
                d[k] = rng.choice(values) if k != "overrides" else rng.choice(
                    [[], [{"pattern": rng.choice(values), "policy": rng.choice(values)}], [1], "x"])
            else:
                d[k] = {s: rng.choice(values) for s in rng.sample(sub, rng.randint(1, len(sub)))}
                if rng.random() < 0.7:
                    d[k][sub[0]] = {"loss_scale": "dynamic", "quantization": "nf4", "fp8": "delayed"}[k]
        try:
            Policy.from_dict(d)
        except PolicyError as e:
            refused += 1
            assert "\n" not in str(e) and "\x1b" not in str(e)
    assert refused > 2000
