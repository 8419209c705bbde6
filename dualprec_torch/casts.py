"""Dtype names of the spec as torch dtypes, and the casts a policy applies to data.

`cast_floating` is the one cast helper of the backend: it walks nested collections and
casts floating tensors only (integer, bool and complex tensors pass through untouched),
so `convert_input`, `convert_output` and per-module overrides share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dualprec import checkpoint
from dualprec.dtypes import ALL_DTYPES, FLOAT_DTYPES, HALF_DTYPES

__all__ = ["TORCH_DTYPES", "HALF_TORCH_DTYPES", "torch_dtype", "cast_floating", "default_dtype", "to_numpy"]

# Mapped from the one dtype table (dualprec.dtypes): torch names its dtypes by the canonical
# names.  TORCH_DTYPES holds the policy dtypes; torch_dtype also knows the FP8 formats.
_ALL_TORCH_DTYPES = {name: getattr(torch, name) for name in ALL_DTYPES}
TORCH_DTYPES = {name: _ALL_TORCH_DTYPES[name] for name in FLOAT_DTYPES}
HALF_TORCH_DTYPES = tuple(_ALL_TORCH_DTYPES[name] for name in HALF_DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a canonical dtype name of the spec ("bfloat16" -> torch.bfloat16)."""
    return _ALL_TORCH_DTYPES[name]


def cast_floating(data: Any, dtype: torch.dtype) -> Any:
    """``data`` with every floating tensor cast to ``dtype``, keeping its nesting.

    Walks dicts (any Mapping whose type can be rebuilt from pairs), lists, tuples,
    namedtuples and dataclass instances; anything else is returned as is.
    """
    if isinstance(data, torch.Tensor):
        return data.to(dtype) if data.is_floating_point() and data.dtype != dtype else data
    if isinstance(data, Mapping):
        items = [(k, cast_floating(v, dtype)) for k, v in data.items()]
        try:
            return type(data)(items)
        except TypeError:  # a Mapping that cannot be rebuilt from pairs (e.g. defaultdict)
            return dict(items)
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(cast_floating(v, dtype) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(cast_floating(v, dtype) for v in data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {f.name: cast_floating(getattr(data, f.name), dtype)
                   for f in dataclasses.fields(data) if f.init}
        return dataclasses.replace(data, **changes)
    return data


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Set torch's default floating dtype inside the block; restored even when it raises."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def to_numpy(x: Any) -> np.ndarray | None:
    """A torch tensor as a NumPy array with the same bits (bfloat16 as ``ml_dtypes.bfloat16``,
    through its 16-bit patterns: NaN payloads survive); None for anything else.  Registered
    with `dualprec.checkpoint` so the spec's checkpoint writer takes torch tensors."""
    if not isinstance(x, torch.Tensor):
        return None
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


checkpoint.register_array_converter(to_numpy)
