"""The op table against the installed torch, and the CPU emulation against CUDA autocast.

torch's real AutocastCUDA kernels run here without a GPU: on fake CUDA tensors
(`FakeTensorMode`), with CUDA autocast switched on, every call goes through the same
AutocastCUDA kernel as on a GPU and its output dtype is the GPU's.  Each table entry has a
sample call below; it runs under fake CUDA autocast, under `Precision` on CPU, and through
`optable.dtype_of`, for float32 inputs, compute-dtype inputs, mixed inputs and float64
inputs, under bf16-mixed and 16-mixed: the three must agree.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from dualprec import optable
from dualprec_torch import Precision
from dualprec_torch import ops as top

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
NAMES = {bf16: "bfloat16", f16: "float16", f32: "float32", f64: "float64"}
POLICIES = [("bf16-mixed", bf16), ("16-mixed", f16)]


class T:
    """Tensor factory of a sample call: the k-th floating tensor gets ``dtypes(k)``."""

    def __init__(self, device, dtypes):
        self.device, self.dtypes, self.made = device, dtypes, []

    def __call__(self, *shape):
        dtype = self.dtypes(len(self.made))
        self.made.append(NAMES[dtype])
        return torch.rand(*shape, device=self.device).to(dtype) + 0.1

    def long(self, *shape, high=3):
        return torch.randint(0, high, shape, device=self.device)


def _lstm(t, cell):
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    x, h = t(2, 3), t(2, 4)
    w_ih, w_hh, b_ih, b_hh = t(gates * 4, 3), t(gates * 4, 4), t(gates * 4), t(gates * 4)
    if cell == "lstm":
        return torch.lstm_cell(x, (h, t(2, 4)), w_ih, w_hh, b_ih, b_hh)[0]
    return getattr(torch, f"{cell}_cell")(x, h, w_ih, w_hh, b_ih, b_hh)


def _conv(t):
    return torch.convolution(t(2, 3, 8), t(4, 3, 3), t(4), [1], [0], [1], False, [0], 1)


#: entry name -> sample calls (each reaches one or more of the entry's aten ops).
SAMPLES = {
    "conv": [lambda t: F.conv1d(t(2, 3, 8), t(4, 3, 3), t(4)), lambda t: F.conv2d(t(2, 3, 6, 6), t(4, 3, 3, 3)),
             lambda t: F.conv3d(t(1, 2, 4, 4, 4), t(3, 2, 2, 2, 2)), _conv,
             lambda t: F.conv1d(t(2, 3, 8), t(4, 3, 3), padding="same")],
    "conv_transpose": [lambda t: F.conv_transpose1d(t(2, 3, 8), t(3, 4, 3), t(4)),
                       lambda t: F.conv_transpose2d(t(1, 3, 5, 5), t(3, 2, 3, 3)),
                       lambda t: F.conv_transpose3d(t(1, 2, 3, 3, 3), t(2, 2, 2, 2, 2))],
    "conv_tbc": [lambda t: torch.conv_tbc(t(5, 2, 3), t(3, 3, 4), t(4), 1)],
    "prelu": [lambda t: F.prelu(t(2, 3, 4), t(3))],
    "mm": [lambda t: torch.mm(t(2, 3), t(3, 4))],
    "mv": [lambda t: torch.mv(t(2, 3), t(3))],
    "bmm": [lambda t: torch.bmm(t(2, 2, 3), t(2, 3, 4))],
    "matmul": [lambda t: t(2, 3) @ t(3, 4), lambda t: torch.matmul(t(2, 2, 3), t(3, 4))],
    "einsum": [lambda t: torch.einsum("ij,jk->ik", t(2, 3), t(3, 4))],
    "linear": [lambda t: F.linear(t(2, 3), t(4, 3), t(4)), lambda t: F.linear(t(2, 3), t(4, 3))],
    "addmm": [lambda t: torch.addmm(t(2, 4), t(2, 3), t(3, 4))],
    "addmv": [lambda t: torch.addmv(t(2), t(2, 3), t(3))],
    "addr": [lambda t: torch.addr(t(2, 3), t(2), t(3))],
    "addbmm": [lambda t: torch.addbmm(t(2, 4), t(2, 2, 3), t(2, 3, 4))],
    "baddbmm": [lambda t: torch.baddbmm(t(2, 2, 4), t(2, 2, 3), t(2, 3, 4))],
    "linalg_vecdot": [lambda t: torch.linalg.vecdot(t(2, 3), t(2, 3))],
    "multi_dot": [lambda t: torch.linalg.multi_dot([t(2, 3), t(3, 4), t(4, 2)]),
                  lambda t: torch.chain_matmul(t(2, 3), t(3, 4))],
    "rnn_cell": [lambda t: _lstm(t, "lstm"), lambda t: _lstm(t, "gru"), lambda t: _lstm(t, "rnn_tanh"),
                 lambda t: _lstm(t, "rnn_relu")],
    "scaled_dot_product_attention": [lambda t: F.scaled_dot_product_attention(t(1, 2, 4, 8), t(1, 2, 4, 8),
                                                                              t(1, 2, 4, 8))],
    **{n: [lambda t, n=n: getattr(torch, n)(t(4))]
       for n in ("acos", "asin", "cosh", "sinh", "tan", "exp", "expm1", "log", "log1p", "log2", "log10",
                 "erfinv", "reciprocal", "rsqrt")},
    "pow": [lambda t: torch.pow(t(4), 2), lambda t: torch.pow(2.0, t(4)), lambda t: torch.pow(t(4), t(4)),
            lambda t: t(4) ** 2, lambda t: torch.square(t(4))],
    "softplus": [lambda t: F.softplus(t(4))],
    "layer_norm": [lambda t: F.layer_norm(t(2, 4), (4,), t(4), t(4)), lambda t: F.layer_norm(t(2, 4), (4,)),
                   lambda t: torch.native_layer_norm(t(2, 4), [4], t(4), t(4), 1e-5)[0]],
    "rms_norm": [lambda t: F.rms_norm(t(2, 4), (4,), t(4))],
    "group_norm": [lambda t: F.group_norm(t(2, 4, 3), 2, t(4), t(4))],
    "norm": [lambda t: t(4).norm(2), lambda t: t(2, 3).norm(2, dim=1), lambda t: torch.linalg.vector_norm(t(4)),
             lambda t: torch.linalg.matrix_norm(t(3, 3)), lambda t: torch.linalg.matrix_norm(t(3, 3), ord=1),
             lambda t: torch.frobenius_norm(t(3, 3), [0, 1]), lambda t: F.normalize(t(2, 4))],
    "cosine_similarity": [lambda t: F.cosine_similarity(t(2, 4), t(2, 4))],
    "distance": [lambda t: torch.dist(t(4), t(4)), lambda t: F.pdist(t(3, 4)), lambda t: torch.cdist(t(2, 3), t(4, 3))],
    "renorm": [lambda t: torch.renorm(t(3, 4), 2, 0, 1.0)],
    "logsumexp": [lambda t: torch.logsumexp(t(2, 4), 1)],
    "softmax": [lambda t: torch.softmax(t(2, 4), -1), lambda t: F.softmax(t(2, 4), dim=-1)],
    "log_softmax": [lambda t: F.log_softmax(t(2, 4), dim=-1)],
    "sum": [lambda t: t(2, 4).sum(), lambda t: t(2, 4).sum(1)],
    "prod": [lambda t: t(4).prod(), lambda t: t(2, 4).prod(1)],
    "cumsum": [lambda t: t(4).cumsum(0)],
    "cumprod": [lambda t: t(4).cumprod(0)],
    "upsample_nearest": [lambda t: F.interpolate(t(1, 2, 4), scale_factor=2.0, mode=m) for m in ("nearest", "nearest-exact")]
    + [lambda t: F.interpolate(t(1, 2, 4, 4), scale_factor=2.0, mode="nearest"),
       lambda t: F.interpolate(t(1, 2, 2, 2, 2), scale_factor=2.0, mode="nearest-exact")],
    "upsample_linear": [lambda t: F.interpolate(t(1, 2, 4), scale_factor=2.0, mode="linear"),
                        lambda t: F.interpolate(t(1, 2, 4, 4), scale_factor=2.0, mode="bilinear"),
                        lambda t: F.interpolate(t(1, 2, 4, 4), size=(3, 3), mode="bilinear", antialias=True),
                        lambda t: F.interpolate(t(1, 2, 2, 2, 2), scale_factor=2.0, mode="trilinear")],
    "upsample_bicubic": [lambda t: F.interpolate(t(1, 2, 4, 4), scale_factor=2.0, mode="bicubic")],
    "nll_loss": [lambda t: F.nll_loss(t(3, 5), t.long(3)), lambda t: F.cross_entropy(t(3, 5), t.long(3)),
                 lambda t: F.nll_loss(t(2, 5, 3, 3), t.long(2, 3, 3))],
    "mse_loss": [lambda t: F.mse_loss(t(4), t(4))],
    "l1_loss": [lambda t: F.l1_loss(t(4), t(4))],
    "smooth_l1_loss": [lambda t: F.smooth_l1_loss(t(4), t(4))],
    "huber_loss": [lambda t: F.huber_loss(t(4), t(4))],
    "kl_div": [lambda t: F.kl_div(t(4), t(4), reduction="batchmean")],
    "binary_cross_entropy_with_logits": [lambda t: F.binary_cross_entropy_with_logits(t(4), t(4))],
    "poisson_nll_loss": [lambda t: F.poisson_nll_loss(t(4), t(4))],
    "cosine_embedding_loss": [lambda t: F.cosine_embedding_loss(t(2, 4), t(2, 4), t(2))],
    "hinge_embedding_loss": [lambda t: F.hinge_embedding_loss(t(4), t(4))],
    "margin_ranking_loss": [lambda t: F.margin_ranking_loss(t(4), t(4), t(4))],
    "multilabel_margin_loss": [lambda t: F.multilabel_margin_loss(t(2, 4), t.long(2, 4))],
    "soft_margin_loss": [lambda t: F.soft_margin_loss(t(4), t(4))],
    "triplet_margin_loss": [lambda t: F.triplet_margin_loss(t(2, 4), t(2, 4), t(2, 4))],
    "multi_margin_loss": [lambda t: F.multi_margin_loss(t(2, 4), t.long(2))],
    "addcdiv": [lambda t: torch.addcdiv(t(4), t(4), t(4))],
    "addcmul": [lambda t: torch.addcmul(t(4), t(4), t(4))],
    "atan2": [lambda t: torch.atan2(t(4), t(4))],
    "bilinear": [lambda t: F.bilinear(t(2, 3), t(2, 4), t(5, 3, 4), t(5))],
    "cross": [lambda t: torch.cross(t(2, 3), t(2, 3), dim=1)],
    "dot": [lambda t: torch.dot(t(3), t(3)), lambda t: torch.vdot(t(3), t(3))],
    "grid_sampler": [lambda t: F.grid_sample(t(1, 1, 4, 4), t(1, 2, 2, 2) - 0.5, align_corners=False)],
    "index_put": [lambda t: t(4).index_put((t.long(2),), t(2))],
    "scatter_add": [lambda t: t(4).scatter_add(0, t.long(2), t(2))],
    "tensordot": [lambda t: torch.tensordot(t(2, 3), t(3, 4), dims=1)],
}
#: entries without a sample here, and why
NO_SAMPLE = {"cudnn_rnn": "registered by CUDA builds only"}

#: ops on no list: the emulation must leave them as CUDA does (the first three are float32
#: under plain CPU autocast)
UNLISTED = {
    "reflection_pad": lambda t: F.pad(t(1, 2, 5), (2, 2), mode="reflect"),
    "replication_pad": lambda t: F.pad(t(1, 2, 5), (2, 2), mode="replicate"),
    "avg_pool3d": lambda t: F.avg_pool3d(t(1, 1, 2, 2, 2), 2),
    "mean": lambda t: t(2, 4).mean(1),
    "var": lambda t: t(2, 4).var(1),
    "std": lambda t: t(2, 4).std(),
    "batch_norm": lambda t: F.batch_norm(t(4, 3), None, None, t(3), t(3), training=True),
    "gelu": lambda t: F.gelu(t(4)),
    "silu": lambda t: F.silu(t(4)),
    "sigmoid": lambda t: torch.sigmoid(t(4)),
    "add": lambda t: t(4) + t(4),
    "cat": lambda t: torch.cat([t(4), t(4)]),
    "stack": lambda t: torch.stack([t(4), t(4)]),
    "sqrt": lambda t: torch.sqrt(t(4)),
    "tanh": lambda t: torch.tanh(t(4)),
}

#: CPU kernels that refuse a dtype mix CUDA's accept (with or without autocast)
CPU_KERNEL_LIMITS = {"batch_norm": "CPU batch_norm wants parameters in the input's dtype"}

CONFIGS = {  # input dtype pattern: k-th floating tensor's dtype
    "float32": lambda c: (lambda k: f32),
    "compute": lambda c: (lambda k: c),
    "mixed": lambda c: (lambda k: f32 if k % 2 == 0 else c),
    "float64": lambda c: (lambda k: f64),
}


_NO_CUDA = ("not linked with support for cuda", "Torch not compiled with CUDA", "Found no NVIDIA driver")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _cuda_autocast(dtype):
    """CUDA autocast without a GPU: torch's AutocastCUDA kernels run on fake CUDA tensors."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.clear_autocast_cache()


def _run(sample, device, dtypes):
    t = T(device, dtypes)
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(_first(sample(t)).dtype).removeprefix("torch."), t.made
    except (RuntimeError, AssertionError) as e:
        text = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        if device == "cuda" and any(s in text for s in _NO_CUDA):
            return "n/a", t.made  # the fake run reached a kernel choice that needs a CUDA build
        return f"error: {text}", t.made


def cuda_dtype(sample, compute, dtypes):
    with _cuda_autocast(compute):
        return _run(sample, "cuda", dtypes)


def precision_dtype(sample, policy, dtypes):
    with Precision(policy, device="cpu").autocast():
        return _run(sample, "cpu", dtypes)


# ----- the table is the installed torch's ---------------------------------------------------
def test_table_is_exactly_the_aten_ops_with_an_autocast_cuda_kernel():
    names = torch._C._dispatch_get_all_op_names()
    cuda = {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCUDA")}
    table = set(optable.aten_lists()) - {f"aten::{n}" for n in optable.CUDA_BUILD_ONLY}
    assert not cuda - table, f"AutocastCUDA kernels missing from the table: {sorted(cuda - table)}"
    assert not table - cuda, f"table ops without an AutocastCUDA kernel: {sorted(table - cuda)}"
    for n in optable.CUDA_BUILD_ONLY:
        assert f"aten::{n}" in names and f"aten::{n}" not in cuda  # a real op, registered by CUDA builds


def test_every_entry_has_a_sample():
    names = {e.name for e in optable.ENTRIES + optable.BANNED}
    assert set(SAMPLES) | set(NO_SAMPLE) | {"binary_cross_entropy"} == names


def test_fake_cuda_autocast_is_real():
    """The stand-in is torch's CUDA autocast: matmul lowered, exp raised, mean left alone."""
    x = [None]
    with _cuda_autocast(bf16):
        x = torch.rand(4, 4, device="cuda")
        assert (x @ x).dtype == bf16
        h = x.to(f16)
        assert h.exp().dtype == f32 and h.mean().dtype == f16


@pytest.mark.parametrize("policy,compute", POLICIES)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_entry_dtypes_cuda_precision_and_table_agree(name, policy, compute):
    """Per entry: fake CUDA autocast (the truth), Precision on CPU and the table agree."""
    e = optable.entry(name)
    bad = []
    for i, sample in enumerate(SAMPLES[name]):
        for cfg, make in CONFIGS.items():
            want, made = cuda_dtype(sample, compute, make(compute))
            got, _ = precision_dtype(sample, policy, make(compute))
            try:
                table = optable.dtype_of(e, policy, made)
            except ValueError as err:
                table = f"error: {err}"
            if want == "n/a":
                ok = got == table  # no CUDA answer in a CPU build: the table decides
            elif want.startswith("error"):
                # torch refuses this dtype mix on CUDA too; the emulation must refuse it as well
                ok = got.startswith("error")
            else:
                ok = want == got == table
            if not ok:
                bad.append(f"sample {i} {cfg} inputs {made}: cuda {want}, Precision/CPU {got}, table {table}")
    assert not bad, f"{name} ({e.list}) under {policy}:\n" + "\n".join(bad)


@pytest.mark.parametrize("policy,compute", POLICIES)
def test_unlisted_ops_keep_cuda_dtypes(policy, compute):
    bad = []
    for name, sample in UNLISTED.items():
        assert optable.op_list(name) is None
        for cfg in ("compute", "mixed"):
            make = CONFIGS[cfg](compute)
            want, made = cuda_dtype(sample, compute, make)
            got, _ = precision_dtype(sample, policy, make)
            if got.startswith("error") and name in CPU_KERNEL_LIMITS:
                continue
            if want != got and not (want.startswith("error") and got.startswith("error")):
                bad.append(f"{name} {cfg} {made}: cuda {want}, Precision/CPU {got}")
    assert not bad, "\n".join(bad)


def test_binary_cross_entropy_is_refused_as_on_cuda():
    with pytest.raises(RuntimeError, match="unsafe to autocast"):
        with _cuda_autocast(bf16):
            x = torch.rand(4, device="cuda")
            F.binary_cross_entropy(x, x)
    x = torch.rand(4)
    with pytest.raises(RuntimeError, match="unsafe to autocast"):
        with Precision("bf16-mixed", device="cpu").autocast():
            F.binary_cross_entropy(x, x)
    assert F.binary_cross_entropy(x, x).dtype == f32  # outside: plain torch


def test_explicit_dtype_is_kept():
    x = torch.rand(4, 4).to(bf16)
    with Precision("bf16-mixed", device="cpu").autocast():
        assert x.sum(dtype=bf16).dtype == bf16
        assert x.softmax(-1, dtype=bf16).dtype == bf16
        assert x.cumsum(0, dtype=f16).dtype == f16
        assert x.sum().dtype == f32


# ----- harmless outside Precision -------------------------------------------------------------
def _plain_cpu_dtypes(compute):
    out = {}
    for name, samples in [*SAMPLES.items(), *((k, [v]) for k, v in UNLISTED.items())]:
        for i, sample in enumerate(samples):
            for cfg in ("compute", "mixed"):
                with torch.autocast("cpu", dtype=compute):
                    out[name, i, cfg] = _run(sample, "cpu", CONFIGS[cfg](compute))[0]
    return out


def test_plain_cpu_autocast_unchanged_by_the_installed_table():
    top.install_cpu_table()
    with_table = _plain_cpu_dtypes(bf16)
    top.uninstall_cpu_table()
    try:
        without = _plain_cpu_dtypes(bf16)
    finally:
        top.install_cpu_table()
    diff = {k: (without[k], with_table[k]) for k in without if without[k] != with_table[k]}
    assert not diff, diff


# ----- the three kernel sets agree bit for bit ------------------------------------------------
def _bits(sample, policy, compute, cfg, inside):
    """Each output's dtype and bytes (or the error) of one sample call, under Precision
    (``inside``: CUDA's rule) or under plain CPU autocast (CPU autocast's rule)."""
    t = T("cpu", CONFIGS[cfg](compute))
    torch.manual_seed(0)
    context = Precision(policy, device="cpu").autocast() if inside else torch.autocast("cpu", dtype=compute)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with context:
                out = sample(t)
    except (RuntimeError, AssertionError) as e:
        return "error: " + (str(e).splitlines()[0] if str(e) else type(e).__name__)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [(o.dtype, o.detach().contiguous().flatten().view(torch.uint8).tolist()) for o in outs
            if isinstance(o, torch.Tensor)]


def _all_bits():
    return {(name, i, policy, cfg, inside): _bits(sample, policy, compute, cfg, inside)
            for name, samples in [*SAMPLES.items(), *((k, [v]) for k, v in UNLISTED.items())]
            for i, sample in enumerate(samples) for policy, compute in POLICIES
            for cfg in ("compute", "mixed") for inside in (True, False)}


@pytest.mark.slow  # about 4 s of CPU: every sample three times over
def test_cpp_kernels_unboxed_and_boxed_and_python_kernels_agree_bit_for_bit():
    """The unboxed C++ kernels (exp, pow, sum, softmax, layer_norm, ...), the generic boxed C++
    kernel and the Python kernels give the same dtypes, bits and errors on every sample, inside
    Precision and under plain CPU autocast."""
    got = {}
    try:
        for variant, language, fast in (("c++ unboxed", "c++", True), ("c++ boxed", "c++", False),
                                        ("python", "python", True)):
            top.install_cpu_table(language, fast=fast)
            assert top.kernel_language() == language
            got[variant] = _all_bits()
    finally:
        top.install_cpu_table("c++", fast=True)
    lib = top._native["lib"]
    assert sum(lib.dualprec_optable_has_fast(n.encode()) for n in top.cpu_kernels()) >= 12  # the unboxed ones ran
    ref = got["c++ unboxed"]
    assert any(isinstance(v, list) for v in ref.values()) and any(isinstance(v, str) for v in ref.values())
    for variant in ("c++ boxed", "python"):
        diff = sorted(k for k in ref if got[variant][k] != ref[k])
        assert not diff, (variant, diff[:10])
