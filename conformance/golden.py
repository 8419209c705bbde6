"""Golden files: a model's numerics under a policy, recorded once to .npz, checked later.

A golden file holds named float arrays (outputs, activations, gradients, losses; bfloat16
is stored as its uint16 bits, because .npz cannot hold ml_dtypes) and a JSON header with
the policy, the backend and library versions.  ``np.load(allow_pickle=False)`` reads it: a
golden file can never execute code.  Checking compares each array with the tolerance of the
policy's compute dtype (see tolerances.py) and returns Records like every other check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from dualprec import Policy

from .numerics import diff, dtype_name
from .records import Record
from .tolerances import ModelShape, tolerance

FORMAT = 1
_BF16_TAG = "__bf16__"


def save(path, arrays: Mapping[str, np.ndarray], policy, **meta) -> Path:
    """Write ``arrays`` and a header (policy, versions, ``meta``) to ``path`` (.npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pol = policy if isinstance(policy, Policy) else Policy.parse(policy)
    payload = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            payload[_BF16_TAG + name] = a.view(np.uint16)
        else:
            payload[name] = a
    header = {"format": FORMAT, "policy": str(pol), "versions": _versions(), **meta}
    payload["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez_compressed(f, **payload)
    return path


def load(path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(Path(path), allow_pickle=False) as z:
        header = json.loads(bytes(z["__header__"]).decode())
        arrays = {}
        for key in z.files:
            if key == "__header__":
                continue
            if key.startswith(_BF16_TAG):
                arrays[key[len(_BF16_TAG):]] = z[key].view(ml_dtypes.bfloat16)
            else:
                arrays[key] = z[key]
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: golden format {header.get('format')!r}, this dualprec reads {FORMAT}")
    return arrays, header


def check(path, arrays: Mapping[str, np.ndarray], policy=None, shape: ModelShape | None = None,
          model: str = "golden") -> list[Record]:
    """Compare ``arrays`` with the golden file: one Record per array, plus one for arrays
    missing on either side.  The tolerance is the forward tolerance of the policy's compute
    dtype for ``shape`` (default: a 4-layer model) or 0 for integer arrays."""
    golden, header = load(path)
    pol = Policy.parse(policy if policy is not None else header["policy"])
    if str(pol) != header["policy"]:
        return [Record(str(pol), model, "golden", "bit-exact", "fail",
                       reason=f"{path} was recorded under {header['policy']}, not {pol}")]
    tol = tolerance(pol, shape or ModelShape(n_round=8, n_reduce=256, n_layers=4))
    recs = []
    missing = sorted(set(golden) ^ set(arrays))
    if missing:
        recs.append(Record(str(pol), model, "golden:arrays", "bit-exact", "fail",
                           reason=f"arrays only on one side: {missing[:5]}", where=missing[0]))
    for name in sorted(set(golden) & set(arrays)):
        g, a = golden[name], np.asarray(arrays[name])
        exact = g.dtype.kind in "iub"
        d = diff(a, g, tol.compute_dtype, 0.0 if exact else tol.forward)
        ok = d.ok and (dtype_name(a) == dtype_name(g)) and (not exact or d.max_abs == 0)
        reason = "" if ok else (f"{name}: max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g} ({d.max_ulp:.1f} ULP of "
                                f"{tol.compute_dtype}) > tol {tol.forward:.3g}; dtype {dtype_name(a)} vs golden "
                                f"{dtype_name(g)}")
        recs.append(Record(str(pol), model, f"golden:{name}", "bit-exact" if exact else "tolerance",
                           "pass" if ok else "fail", reason=reason, max_abs_err=d.max_abs, max_rel_err=d.max_rel,
                           max_ulp_err=d.max_ulp, tolerance=0.0 if exact else tol.forward, where=name))
    return recs


def capture(session, x: np.ndarray, y: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The numerics worth freezing from a backend Session: output, activations, loss, grads."""
    out, inter = session.forward(x)
    arrays = {"output": out, **{f"act/{k}": v for k, v in inter.items()}}
    if y is not None:
        loss, grads = session.loss_and_grads(x, y)
        arrays["loss"] = np.float32(loss)
        arrays.update({f"grad/{k}": v for k, v in grads.items()})
    return arrays


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("dualprec", "torch", "jax", "flax", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
