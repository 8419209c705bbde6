"""torch's own CUDA autocast test lists, op by op, under `Precision` on CPU.

``torch.testing._internal.autocast_test_lists.AutocastTestLists`` holds the ops and arguments
torch's CUDA autocast tests (test/test_cuda.py) run.  Each op here runs three ways:

- under torch's real CUDA autocast, on fake CUDA tensors (no GPU): the dtype CUDA gives;
- under ``dualprec_torch.Precision(policy).autocast()`` on CPU, with the same arguments: it
  must give that dtype (or fail where CUDA fails), and the same bits as the op run without
  autocast on its arguments cast as the list says (the check test_cuda.py makes);
- inside a ``torch.utils.checkpoint`` region (non-reentrant, then reentrant), backward outside
  the block: the recomputation must reproduce the forward's dtype (the non-reentrant kind
  raises otherwise; the reentrant kind would silently recompute in another dtype).

torch's module needs ``expecttest`` only for its test base class; where that package is not
installed a stand-in module with ``TestCase`` is registered before the import.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from autocast_lists_support import LISTS, entries, lists_for
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from dualprec_torch import Precision

bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
POLICIES = [("bf16-mixed", bf16), ("16-mixed", f16)]


#: ops skipped, each with its reason
SKIP = {
    "cudnn_convolution": "cuDNN kernel: CUDA builds only (no CPU kernel)",
    "cudnn_convolution_transpose": "cuDNN kernel: CUDA builds only (no CPU kernel)",
    "einsum": "the list's entry is (op, equation, operands) with 2-D operands for a 4-D equation; "
              "test_cuda.py reads the operands as its ROCm skip flag and never runs it (einsum is "
              "checked in test_torch_ops_table.py)",
    "equal": "returns a Python bool, no dtype to compare (and fake tensors cannot compute its "
             "data-dependent answer)",
}




def _ids():
    lists = lists_for("cpu")[1]
    out = []
    for name in LISTS:
        for i, (op, *_rest) in enumerate(entries(lists, name)):
            out.append((name, i, op))
    return out


ENTRIES = _ids()


def _fn(kind, op):
    if kind == "method":
        return lambda *a, **k: getattr(a[0], op)(*a[1:], **k)
    module = {"torch": torch, "nn": torch._C._nn, "linalg": torch._C._linalg}[kind]
    return getattr(module, op)


def _cast(args, dtype):
    def one(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
            return a.to(dtype)
        if isinstance(a, (tuple, list)) and a and isinstance(a[0], torch.Tensor):
            return type(a)(one(t) for t in a)
        return a
    return tuple(one(a) for a in args)


_NO_CUDA = ("not linked with support for cuda", "Torch not compiled with CUDA", "Found no NVIDIA driver")
#: the fake CUDA run reached a kernel that only a CUDA build has (the fused RNN cells, cuDNN's
#: grid sampler for float16): the list's own expectation stands in for CUDA's answer
NO_CUDA = "needs a CUDA build"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _outcome(call):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _first(call())
    except (RuntimeError, TypeError, NotImplementedError, AssertionError) as e:
        text = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        if any(s in text for s in _NO_CUDA):
            return NO_CUDA
        return f"error: {text}"


def _cuda(name, i, compute):
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    mode, lists = lists_for("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", compute)
    try:
        with mode, torch.no_grad():
            op, args, kwargs, _ = list(entries(lists, name))[i]
            out = _outcome(lambda: _fn(LISTS[name][0], op)(*args, **kwargs))
            return out.dtype if isinstance(out, torch.Tensor) else out
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.clear_autocast_cache()


@pytest.mark.parametrize("policy,compute", POLICIES, ids=[p for p, _ in POLICIES])
@pytest.mark.parametrize("name,i,op", ENTRIES, ids=[f"{n}-{i}-{op}" for n, i, op in ENTRIES])
def test_cuda_autocast_list_entry(name, i, op, policy, compute):
    if op in SKIP:
        pytest.skip(SKIP[op])
    kind, control_as = LISTS[name]
    want = _cuda(name, i, compute)
    if want == NO_CUDA:
        assert control_as is not None, f"{op}: no CUDA answer and no expectation in the list"
        want = compute if control_as == "compute" else f32
    _, args, kwargs, extra = list(entries(lists_for("cpu")[1], name))[i]
    fn = _fn(kind, op)
    with Precision(policy, device="cpu").autocast():
        got = _outcome(lambda: fn(*args, **kwargs))
    if name == "banned":
        assert isinstance(want, str) and isinstance(got, str) and "unsafe to auto" in got, (want, got)
        return
    if isinstance(want, str):
        assert isinstance(got, str), f"{op}: CUDA refuses ({want}); Precision/CPU gives {got.dtype}"
        return
    assert not isinstance(got, str), f"{op}: CUDA gives {want}; Precision/CPU: {got}"
    assert got.dtype == want, f"{op}: CUDA gives {want}, Precision/CPU {got.dtype}"
    if isinstance(extra, torch.dtype):
        assert got.dtype == extra  # the dtype the list itself states
    elif control_as is not None:
        assert want == (compute if control_as == "compute" else f32)
        control = _first(fn(*_cast(args, compute if control_as == "compute" else f32), **kwargs))
        assert torch.equal(got, control), f"{op}: not the bits of the op on arguments cast to {control.dtype}"

    # recomputed in backward, reentrant and not, backward outside the block
    if not got.is_floating_point():
        return
    for reentrant in (False, True):
        grads = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args]
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in grads):
            return
        seen = []

        def region(*a):
            out = _first(fn(*a, **kwargs))
            seen.append(out.dtype)
            return out * out  # mul saves its operands: the backward needs this region recomputed

        with set_checkpoint_early_stop(False):  # read when the region runs: the whole region recomputes
            with Precision(policy, device="cpu").autocast():
                out = checkpoint(region, *grads, use_reentrant=reentrant, preserve_rng_state=False)
            if not out.requires_grad:
                return
            out.float().sum().backward()
        kind = "reentrant" if reentrant else "non-reentrant"
        assert seen == [want, want], f"{op} ({kind}): forward then recomputation dtypes {seen}, CUDA {want}"
