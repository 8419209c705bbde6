"""What both backends' tests of torch's CUDA autocast test lists share: torch's list module
(``torch.testing._internal.autocast_test_lists``, which needs ``expecttest`` only for its test
base class: a stand-in module with ``TestCase`` is registered where that package is absent) and
how each list is called and controlled."""

from __future__ import annotations

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
