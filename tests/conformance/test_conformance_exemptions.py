"""The documented exceptions to bit-exactness, and the zoo twins' pooling that fixed the bf16 CNN."""

import ml_dtypes
import numpy as np

from conformance import exemptions
from dualprec.ref.casts import cast


def test_subnormal_flush_is_absorbed_only_for_its_backend_and_conversion():
    x = np.array([1.0, 1e-40, -1e-40, 3.0], np.float32)
    expect = cast(x, "float64")
    flushed = np.array([1.0, 0.0, -0.0, 3.0], np.float64)
    got, notes = exemptions.apply("jax", x, flushed, expect)
    assert np.array_equal(got, expect) and len(notes) == 1 and "2 element" in notes[0]
    # another backend, a wrong sign, or a normal value flushed are not exempt
    assert exemptions.apply("torch", x, flushed, expect)[1] == []
    wrong_sign = np.array([1.0, -0.0, -0.0, 3.0])
    assert not np.array_equal(exemptions.apply("jax", x, wrong_sign, expect)[0], expect)
    normal_lost = np.array([0.0, 0.0, -0.0, 3.0])
    assert exemptions.apply("jax", x, normal_lost, expect)[0][0] == 0.0
    # bfloat16 targets keep subnormals in every backend: no exemption
    bf = cast(x, "bfloat16")
    assert exemptions.apply("jax", x, bf, bf)[1] == []


def test_zoo_avg_pool_sums_half_inputs_in_float32_like_torch():
    import jax.numpy as jnp
    import torch

    from conformance.backends.torch_backend import from_numpy, to_numpy
    from conformance.zoo.flax_models import avg_pool

    x = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(ml_dtypes.bfloat16)
    want = to_numpy(torch.nn.functional.avg_pool2d(from_numpy(x), 2))
    got = np.asarray(avg_pool(jnp.asarray(np.transpose(x, (0, 2, 3, 1))), (2, 2)))
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(np.transpose(got, (0, 3, 1, 2)).view(np.uint16), want.view(np.uint16))


def test_a_backend_that_cannot_import_is_an_error_not_a_skip():
    from conformance.backends.torch_backend import TorchBackend
    from dualprec import Policy

    class Broken(TorchBackend):
        package = "no_such_dualprec_backend"

    assert Broken().unsupported(Policy.parse("32-true")) is None  # so its checks run, and error
