"""What both backends' tests of torch's CUDA autocast test lists share: torch's list module
(``torch.testing._internal.autocast_test_lists``, which needs ``expecttest`` only for its test
base class: a stand-in module with ``TestCase`` is registered where that package is absent) and
how each list is called and controlled."""

from __future__ import annotations

import functools
import sys
import types
import unittest

import pytest

if "expecttest" not in sys.modules:
    try:
        import expecttest  # noqa: F401
    except ImportError:
        _stand_in = types.ModuleType("expecttest")
        _stand_in.TestCase = unittest.TestCase
        sys.modules["expecttest"] = _stand_in
autocast_test_lists = pytest.importorskip("torch.testing._internal.autocast_test_lists")

#: list name -> (how torch calls it, dtype the arguments are cast to for the bitwise control:
#: "compute", "float32", or None for no cast), as torch's test_cuda.py uses each list
LISTS = {
    "torch_expect_builtin_promote": ("torch", None),
    "methods_expect_builtin_promote": ("method", None),
    "torch_fp16": ("torch", "compute"),
    "torch_fp32": ("torch", "float32"),
    "torch_need_autocast_promote": ("torch", "float32"),
    "nn_fp16": ("nn", "compute"),
    "nn_fp32": ("nn", "float32"),
    "linalg_fp16": ("linalg", "compute"),
    "methods_fp16": ("method", "compute"),
    "methods_fp32": ("method", "float32"),
    "banned": ("nn", None),
}


def entries(lists, name):
    """(op, args, kwargs, the list's third item) of each entry of list ``name``."""
    for item in getattr(lists, name):
        op, args = item[0], item[1]
        extra = item[2] if len(item) > 2 else None
        yield op, args, (extra if isinstance(extra, dict) else {}), extra


@functools.cache
def lists_for(device):
    """The lists, built once per device (the calls do not modify their arguments); the fake
    CUDA ones with the FakeTensorMode that owns their tensors: (mode or None, lists)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    if device == "cpu":
        return None, autocast_test_lists.AutocastTestLists("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return mode, autocast_test_lists.AutocastTestLists("cuda")
