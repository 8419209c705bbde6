"""The one dtype table (dualprec.dtypes) and what the backends and the reference map from it."""

import numpy as np
import pytest

from dualprec import dtypes
from dualprec.ref import casts as ref_casts


def test_table_rows_agree_with_numpy():
    assert dtypes.ALL_DTYPES == tuple(d.name for d in dtypes.TABLE)
    assert dtypes.FLOAT_DTYPES == ("float64", "float32", "bfloat16", "float16")
    assert dtypes.HALF_DTYPES == ("bfloat16", "float16")
    for d in dtypes.TABLE:
        npd = dtypes.numpy_dtype(d.name)
        assert npd.name == d.name and npd.itemsize * 8 == d.bits == dtypes.dtype_bits(d.name)
        assert dtypes.dtype_info(d.name) is d
    assert [dtypes.short_dtype(n) for n in dtypes.FLOAT_DTYPES] == ["f64", "f32", "bf16", "f16"]
    # every short policy name is an alias canonical_dtype accepts
    assert all(dtypes.canonical_dtype(dtypes.short_dtype(n)) == n for n in dtypes.FLOAT_DTYPES)


def test_reference_casts_use_the_table():
    assert ref_casts.DTYPES == {n: dtypes.numpy_dtype(n) for n in dtypes.ALL_DTYPES}
    assert ref_casts.dtype_name(np.float16) == "float16"


def test_torch_maps_every_name():
    torch = pytest.importorskip("torch")
    from dualprec_torch import casts

    assert list(casts.TORCH_DTYPES) == list(dtypes.FLOAT_DTYPES)
    assert casts.HALF_TORCH_DTYPES == (torch.bfloat16, torch.float16)
    for d in dtypes.TABLE:
        t = casts.torch_dtype(d.name)
        assert t.itemsize * 8 == d.bits and str(t) == f"torch.{d.name}"
        if d.in_policy:
            assert dtypes.canonical_dtype(t) == d.name


def test_jax_maps_every_policy_name():
    jnp = pytest.importorskip("jax.numpy")
    from dualprec_jax.casts import jax_dtype

    for name in ("float32", "bfloat16", "float16"):
        assert jax_dtype(name) == jnp.dtype(name) == dtypes.numpy_dtype(name)
