"""Precision checkpoints that either backend can resume: safetensors tensors plus a JSON header.

Everything a `Precision` keeps besides the model weights and the optimizer's own state goes
into one file: the policy string, the loss-scale state, float32 master weights keyed by
parameter name, and whatever a feature module registers (FP8 scales and amax histories,
quantized weights).  Loading never unpickles anything::

    state = precision.state_dict()                 # torch; JAX: precision.state_dict(opt_state)
    save_state("run/precision.safetensors", state)
    state = load_state("run/precision.safetensors")
    precision.load_state_dict(state)               # JAX: opt_state = precision.load_state_dict(state, opt_state)

File layout: tensor names are flat dotted strings (``loss_scale.scale``, ``loss_scale.counter``,
``master.<param name>``, ``fp8.<layer path>.<state name>``, quantized weights under
bitsandbytes' key names); the safetensors metadata entry ``dualprec`` holds the header JSON:
``format``, ``version``, ``policy``, the extensions and their tensor names, and a SHA-256 of
the tensor bytes, so a truncated or altered file is refused rather than half loaded.  Writes
go to a temporary file in the same directory, then a rename: a crash mid-save leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

__all__ = ["FORMAT", "VERSION", "save", "load", "save_state", "load_state", "state_to_file", "loadable_extensions",
           "state_from_file", "new_state", "check_state", "StateExtension", "register_state_extension",
           "state_extensions"]

FORMAT = "dualprec.precision"
VERSION = 2
_META_KEY = "dualprec"


# ----------------------------------------------------------------------------- the file
def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = _contiguous(tensors[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _storable(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf" or a.dtype.itemsize not in (1, 2, 4, 8):
        raise CheckpointError(f"checkpoint tensors must be numeric arrays, got dtype {a.dtype}")
    return _contiguous(a)


def _contiguous(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")  # np.ascontiguousarray makes 0-d 1-d


def save(path, header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (flat name -> array) and ``header`` (JSON-ready, with "format",
    "version" and "policy") to ``path`` atomically."""
    from safetensors.numpy import save_file

    for key in ("format", "version", "policy"):
        if key not in header:
            raise CheckpointError(f"checkpoint header needs {key!r}")
    arrays = {str(k): _storable(v) for k, v in tensors.items()}
    head = dict(header, sha256=_digest(arrays))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata={_META_KEY: json.dumps(head, sort_keys=True)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(header, tensors)`` from a file `save` wrote; CheckpointError if it is not one, is
    truncated, or its tensors are not the ones it was written with."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: not a readable dualprec checkpoint (truncated or not safetensors: "
                              f"{e})") from None
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file without a dualprec header; not a precision checkpoint")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the dualprec header is not valid JSON ({e}); the file was altered") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the dualprec header is not a JSON object; the file was altered")
    digest = header.pop("sha256", None)
    if digest != _digest(tensors):
        raise CheckpointError(f"{path}: the tensors do not match the checksum in the header; the file was "
                              "altered or damaged after it was written")
    return header, tensors


# ------------------------------------------------------------------ the precision state
@dataclasses.dataclass(frozen=True)
class StateExtension:
    """State a feature module keeps for one backend (FP8 scales, quantized weights).

    ``state_tensors(target)`` returns flat name -> NumPy array; ``load_state_tensors(target,
    tensors)`` restores them and returns the target (or None when it restores in place).
    The target is what the backend's Precision hands over: the torch model given to
    ``setup``, the JAX variables passed to ``state_dict`` / ``load_state_dict``."""

    name: str
    backend: str
    state_tensors: Callable[[Any], dict]
    load_state_tensors: Callable[[Any, dict], Any]


_EXTENSIONS: dict[tuple[str, str], StateExtension] = {}


def register_state_extension(backend: str, name: str, state_tensors, load_state_tensors) -> None:
    """One line in a feature module: ``register_state_extension("torch", "fp8", state_tensors,
    load_state_tensors)``; the backend's Precision then carries that state in checkpoints."""
    _EXTENSIONS[(backend, name)] = StateExtension(name, backend, state_tensors, load_state_tensors)


def state_extensions(backend: str) -> dict[str, StateExtension]:
    return {name: ext for (b, name), ext in _EXTENSIONS.items() if b == backend}


def loadable_extensions(backend: str, saved: Mapping[str, Mapping], strict: bool) -> list[tuple[StateExtension, Mapping]]:
    """(extension, tensors) for each extension state in a checkpoint that ``backend`` has a
    module for.  One it has none for is refused under ``strict`` and dropped otherwise."""
    known = state_extensions(backend)
    out = []
    for name, tensors in saved.items():
        if name in known:
            out.append((known[name], tensors))
        elif strict:
            raise CheckpointError(f"the checkpoint carries {name!r} state, which dualprec_{backend} has no "
                                  "module registered for; pass strict=False to drop it")
    return out


def new_state(policy, scale: float, counter: int, masters: Mapping[str, np.ndarray] | None = None,
              extensions: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict:
    """The backend-neutral precision state dict both backends produce and accept.  Arrays are
    NumPy (or, from torch, tensors: `state_to_file` converts them)."""
    from .policy import Policy

    return {"format": FORMAT, "version": VERSION, "policy": str(Policy.parse(policy)),
            "loss_scale": {"scale": float(np.float32(scale)), "counter": int(counter)},
            "master_weights": dict(masters or {}), "extensions": {k: dict(v) for k, v in (extensions or {}).items()}}


def check_state(state: Any, policy, strict: bool, what: str = "load_state_dict"):
    """The saved Policy of a precision state, after checking format, version and policy.
    ``strict``: the saved policy must equal ``policy`` (otherwise only what both share loads)."""
    from .policy import Policy

    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        hint = ""
        if isinstance(state, Mapping) and "_growth_tracker" in state:
            hint = (" (this looks like a torch.amp.GradScaler state dict: load it with "
                    "precision.load_grad_scaler_state(...))")
        elif isinstance(state, Mapping) and state.get("format") == "dualprec_torch.Precision":
            hint = " (a dualprec_torch state dict of format version 1: the torch backend still loads it)"
        raise CheckpointError(f"{what}: not a dualprec precision state{hint}; got "
                              f"{type(state).__name__}{' with format ' + repr(state.get('format')) if isinstance(state, Mapping) else ''}")
    version = state.get("version")
    if not isinstance(version, int) or version < 1 or version > VERSION:
        raise CheckpointError(f"{what}: precision state version {version!r}; this dualprec reads versions "
                              f"1..{VERSION} (a newer dualprec wrote it: upgrade)")
    saved = Policy.parse(state["policy"])
    if strict and saved != policy:
        raise CheckpointError(f'{what}: this checkpoint was written under policy "{saved}", this Precision '
                              f'runs "{policy}"; resume with Precision("{saved}"), or pass strict=False to '
                              "take only the parts both policies share")
    return saved


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes

            return x.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def state_to_file(state: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
    """A precision state dict as ``(header, flat tensors)`` for `save`."""
    check_state(state, None, strict=False, what="save_state")
    tensors = {"loss_scale.scale": np.asarray(state["loss_scale"]["scale"], np.float32),
               "loss_scale.counter": np.asarray(state["loss_scale"]["counter"], np.int32)}
    for name, t in state.get("master_weights", {}).items():
        tensors[f"master.{name}"] = _to_numpy(t)
    ext_names = {}
    for ext, ts in state.get("extensions", {}).items():
        ext_names[ext] = sorted(ts)
        for name, t in ts.items():
            if name in tensors:
                raise CheckpointError(f"save_state: extension {ext!r} reuses the tensor name {name!r}")
            tensors[name] = _to_numpy(t)
    bf16 = sorted(n for n, a in tensors.items() if a.dtype.name == "bfloat16")
    for n in bf16:  # safetensors' NumPy side has no bfloat16: stored as its bits
        tensors[n] = tensors[n].view(np.uint16)
    header = {"format": FORMAT, "version": VERSION, "policy": state["policy"],
              "masters": sorted(state.get("master_weights", {})), "extensions": ext_names, "bfloat16": bf16}
    return header, tensors


def state_from_file(header: Mapping, tensors: Mapping[str, np.ndarray]) -> dict:
    """The precision state dict of ``(header, tensors)`` read by `load`."""
    if header.get("format") != FORMAT:
        raise CheckpointError(f"not a precision checkpoint: format {header.get('format')!r}, expected {FORMAT!r}")
    tensors = dict(tensors)
    for n in header.get("bfloat16", []):
        import ml_dtypes

        tensors[n] = tensors[n].view(ml_dtypes.bfloat16)
    try:
        scale, counter = tensors["loss_scale.scale"], tensors["loss_scale.counter"]
        masters = {name: tensors[f"master.{name}"] for name in header.get("masters", [])}
        exts = {ext: {n: tensors[n] for n in names} for ext, names in header.get("extensions", {}).items()}
    except KeyError as e:
        raise CheckpointError(f"precision checkpoint lacks the tensor {e.args[0]!r} its header lists") from None
    state = new_state(header["policy"], float(scale), int(counter), masters, exts)
    state["version"] = header.get("version")
    return state


def save_state(path, state: Mapping) -> None:
    """`save` a precision state dict (torch's ``precision.state_dict()``, JAX's
    ``precision.state_dict(opt_state)``)."""
    save(path, *state_to_file(state))


def load_state(path) -> dict:
    """The precision state dict stored at ``path``."""
    return state_from_file(*load(path))
