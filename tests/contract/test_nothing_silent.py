"""Mistakes a new user makes end in an error that says what was expected, never silently."""

import pytest

from dualprec import Policy, PolicyError

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import dualprec_jax  # noqa: E402
import dualprec_torch  # noqa: E402


class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="lm_head")(nn.Dense(4, name="body")(x))


def test_an_override_that_matches_no_module_names_the_closest_paths():
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(3, 4))
    model.add_module("lm_head", torch.nn.Linear(4, 2))
    with pytest.raises(PolicyError, match=r'"@lm_haed" \(closest module paths: lm_head\)'):
        dualprec_torch.Precision("bf16-mixed,@lm_haed=32-true").setup(model)
    with pytest.raises(PolicyError, match=r'"@lm_haed" \(closest module paths: lm_head\)'):
        dualprec_jax.Precision("bf16-mixed,@lm_haed=32-true").init(Head(), jax.random.PRNGKey(0), jnp.ones((1, 3)))
    dualprec_torch.Precision("bf16-mixed,@lm_*=32-true").setup(model)  # wildcards that match are fine


def test_wrong_objects_to_the_torch_verbs_are_type_errors():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prec = dualprec_torch.Precision("16-mixed")
    model, opt = prec.setup(model, opt)
    with pytest.raises(TypeError, match="expected the torch.optim.Optimizer"):
        prec.step(model)
    with pytest.raises(TypeError, match="expected the loss as a torch.Tensor"):
        prec.backward(1.0)
    with pytest.raises(TypeError, match=r"pass scaler.state_dict\(\)"):
        prec.load_grad_scaler_state(torch.amp.GradScaler("cpu"))


def test_bf16_true_without_setup_says_what_is_missing():
    prec = dualprec_torch.Precision("bf16-true")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError) as caught:  # torch's own error, passed through, with a note
        with prec.autocast():
            model(prec.convert_input(torch.ones(1, 2)))
    assert any("expected model = precision.setup(model" in n for n in caught.value.__notes__)


def test_an_uncalled_optax_factory_is_a_type_error():
    with pytest.raises(TypeError, match=r"call it, e.g. adamw\(1e-3\)"):
        dualprec_jax.Precision("16-mixed").wrap_optimizer(optax.adamw)


def test_a_policy_file_from_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('schema_version = 99\npolicy = "bf16-mixed"\n')
    with pytest.raises(PolicyError, match="schema_version 99"):
        Policy.load(path)


def test_to_keras_of_bf16_mixed_names_an_ignore_that_works():
    with pytest.raises(PolicyError, match=r"ignore=\('output_dtype',\)"):
        Policy.parse("bf16-mixed").to_keras()
    assert Policy.parse("bf16-mixed").to_keras(ignore=("output_dtype",)) == "mixed_bfloat16"
    assert Policy.parse("mixed_bfloat16").to_keras() == "mixed_bfloat16"


def test_nnx_apply_casts_outputs_like_linen():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    prec = dualprec_jax.Precision("16-mixed")
    model = prec.setup(Net())
    assert prec.apply(model, jnp.ones((1, 3))).dtype == jnp.float32
    linen = prec.apply(Head(), prec.init(Head(), jax.random.PRNGKey(0), jnp.ones((1, 3))), jnp.ones((1, 3)))
    assert linen.dtype == jnp.float32
