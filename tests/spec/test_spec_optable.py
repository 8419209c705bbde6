"""The op table as data (no torch or JAX): lookups, dtypes under a policy, the explain text.
Its agreement with the installed torch: tests/torch/test_torch_ops_table.py."""

import json
import subprocess
import sys

import pytest

from dualprec import Policy, optable
from dualprec.explain import explain


def test_lists_partition_the_entries():
    assert set(optable.LISTS) == {"lower", "fp32", "promote"}
    assert len(optable.LOWER) + len(optable.FP32) + len(optable.PROMOTE) == len(optable.ENTRIES)
    names = [e.name for e in optable.ENTRIES + optable.BANNED]
    assert len(names) == len(set(names))
    atens = [a for e in optable.ENTRIES + optable.BANNED for a in e.aten]
    assert len(atens) == len(set(atens)), "an aten op is on two entries"
    prims = [p for e in optable.ENTRIES for p in e.jax_primitives]
    assert len(prims) == len(set(prims)), "a primitive is claimed by two entries"


@pytest.mark.parametrize("name,kind", [
    ("matmul", "lower"), ("aten::mm", "lower"), ("torch.nn.functional.linear", "lower"), ("dot_general", "lower"),
    ("jax.numpy.einsum", "lower"), ("conv_general_dilated", "lower"), ("flax.linen.Dense", "lower"),
    ("exp", "fp32"), ("aten::pow.Tensor_Scalar", "fp32"), ("pow", "fp32"), ("integer_pow", "fp32"),
    ("rsqrt", "fp32"), ("reduce_sum", "fp32"), ("jax.numpy.sum", "fp32"), ("cumsum", "fp32"),
    ("jax.nn.softmax", "fp32"), ("flax.linen.LayerNorm", "fp32"), ("flax.nnx.RMSNorm", "fp32"),
    ("torch.nn.functional.cross_entropy", "fp32"), ("log", "fp32"), ("erf_inv", "fp32"),
    ("addcmul", "promote"), ("atan2", "promote"), ("jax.numpy.tensordot", "promote"),
    ("binary_cross_entropy", "banned"),
])
def test_op_list(name, kind):
    assert optable.op_list(name) == kind


@pytest.mark.parametrize("name", ["mean", "aten::mean", "var", "std", "batch_norm", "gelu", "jax.nn.gelu",
                                  "torch.mean", "jax.numpy.mean", "reduce_max", "tanh", "silu", "add", "cat"])
def test_on_no_list(name):
    assert optable.op_list(name) is None


@pytest.mark.parametrize("policy,c", [("bf16-mixed", "bfloat16"), ("16-mixed", "float16")])
def test_dtype_of(policy, c):
    d = optable.dtype_of
    assert d("matmul", policy, ["float32", "float32"]) == c
    assert d("linear", policy, [c, "float32", "float32"]) == c
    assert d("exp", policy, [c]) == "float32"
    assert d("layer_norm", policy, [c, "float32"]) == "float32"
    assert d("addcmul", policy, [c, c, c]) == c
    assert d("addcmul", policy, [c, "float32", c]) == "float32"
    assert d("mean", policy, [c]) == c
    assert d("add", policy, [c, "float32"]) == "float32"  # type promotion
    # float64 is never cast
    assert d("exp", policy, ["float64"]) == d("matmul", policy, ["float64", "float64"]) == "float64"
    assert d("sum", policy, []) is None  # no floating input (an integer sum)


def test_dtype_of_without_autocast():
    assert optable.dtype_of("exp", "bf16-true", ["bfloat16"]) == "bfloat16"
    assert optable.dtype_of("matmul", "32-true", ["float32", "float32"]) == "float32"
    assert optable.dtype_of("exp", Policy.parse("bf16-mixed"), ["bfloat16"]) == "float32"
    assert optable.dtype_of("exp", "bfloat16", ["bfloat16"]) == "float32"  # a bare autocast dtype


def test_promote_refuses_the_other_half_dtype_as_torch_does():
    with pytest.raises(ValueError, match="promote"):
        optable.dtype_of("addcmul", "16-mixed", ["bfloat16", "float16"])
    with pytest.raises(ValueError, match="binary_cross_entropy"):
        optable.dtype_of("binary_cross_entropy", "bf16-mixed", ["bfloat16", "bfloat16"])


def test_torch_cast_policy():
    assert optable.torch_cast_policy("aten::sum.dim_IntList") == "fp32_set_opt_dtype"
    assert optable.torch_cast_policy("norm.Scalar") == "fp32_append_dtype"
    assert optable.torch_cast_policy("exp") == "fp32"
    assert optable.torch_cast_policy("mm") == "lower_precision_fp"
    with pytest.raises(KeyError):
        optable.torch_cast_policy("mean")


def test_table_rows_and_text():
    rows = {r["name"]: r for r in optable.table_rows("16-mixed")}
    assert rows["exp"]["output"] == "float32" and rows["matmul"]["output"] == "float16"
    text = optable.render_table("bf16-mixed")
    for word in ("[lower]", "[fp32]", "[promote]", "rsqrt", "dot_general", "mean, var, std"):
        assert word in text
    assert "not applied" in optable.render_table("bf16-true")


def test_explain_carries_the_table(capsys):
    from dualprec.cli import import_backends, main

    assert import_backends() == {}  # explain describes the backends imported in the process
    info = explain(Policy.parse("bf16-mixed"))
    assert info["op_table"][0]["list"] == "lower"
    json.dumps(info)
    assert "stay bfloat16" in info["backends"]["torch"]["normalization / softmax / loss"]
    assert main(["explain", "bf16-mixed"]) == 0
    out = capsys.readouterr().out
    assert "[fp32]" in out and "rsqrt" in out


def test_no_framework_import():
    code = "import sys, dualprec.optable; print('torch' in sys.modules or 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "False"


def _resolve(name):
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)


def test_jax_names_and_primitives_exist():
    """Every JAX counterpart resolves, every primitive name is one JAX defines."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    import sys

    import jax.image  # noqa: F401  (submodules the table names)
    import jax.scipy.special  # noqa: F401
    from jax._src import core

    for e in optable.ENTRIES + optable.BANNED:
        for name in e.jax:
            if not name.startswith("jax.Array"):
                _resolve(name)
    prims = {v.name for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("jax")
             for v in vars(m).values() if isinstance(v, core.Primitive)}
    missing = [p for e in optable.ENTRIES for p in e.jax_primitives if p not in prims]
    assert not missing, missing


def test_torch_names_exist():
    pytest.importorskip("torch")
    for e in optable.ENTRIES + optable.BANNED:
        for name in e.torch:
            _resolve(name)
