"""dualprec_jax.diagnose: the seeded fragile model under nf4 (the outlier layer first), the
zoo transformer's module names match torch's, bad input."""

import pytest

pytest.importorskip("flax")

import dualprec_jax  # noqa: E402
from dualprec import Policy  # noqa: E402
from dualprec.diagnose_cli import load_model  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.mark.slow
def test_nf4_ranks_the_outlier_layer_first():
    got = load_model("fragile", "jax", 0, 1)
    rep = dualprec_jax.diagnose(got["model"], got["variables"], got["batch"], "nf4", steps=1, target=0.15,
                                gains=False)
    assert rep.ranking[0] == "outlier"
    assert rep.meets_target and not Policy.parse(rep.suggested).quantizes("outlier")
    assert rep.module("head").weight_quant_error == pytest.approx(0.09, abs=0.02)


def test_module_paths_are_the_linen_paths_torch_also_uses():
    from dualprec_jax.diagnose import module_list

    got = load_model("transformer", "jax", 0, 1)
    paths = [p for p, _ in module_list(got["model"], got["variables"], got["batch"][0][0])]
    assert sorted(paths) == sorted(["ln1", "attn", "attn.qkv", "attn.proj", "ln2", "mlp", "mlp.fc1", "mlp.fc2",
                                    "head"])


def test_bad_input():
    got = load_model("mlp", "jax", 0, 1)
    with pytest.raises(TypeError, match="linen"):
        dualprec_jax.diagnose(object(), got["variables"], got["batch"], "bf16-mixed")
    import jax

    half = jax.tree_util.tree_map(lambda a: a.astype("float16"), got["variables"])
    with pytest.raises(ValueError, match="float32"):
        dualprec_jax.diagnose(got["model"], half, got["batch"], "bf16-mixed")


@pytest.mark.slow
def test_jitted_and_eager_runs_agree():
    """``jit=True`` changes how a variant runs, not what it computes."""
    import numpy as np

    from dualprec_jax.diagnose import runner

    got = load_model("mlp", "jax", 0, 1)
    traces = [runner(got["model"], got["variables"], got["batch"], steps=1, jit=j)(Policy.parse("bf16-mixed"), True)
              for j in (True, False)]
    assert traces[0].losses == traces[1].losses
    assert sorted(traces[0].outputs[0]) == ["fc1", "fc2", "head"]
    for name, g in traces[0].grads[0].items():
        np.testing.assert_allclose(g, traces[1].grads[0][name], rtol=2e-2, atol=1e-6)  # XLA may fuse differently
