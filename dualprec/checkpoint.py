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
``format``, ``version``, ``policy``, the extensions and their tensor names; the metadata entry
``dualprec.sha256`` holds a SHA-256 of the whole file (both headers and the data, see
`write_checked`), so a truncated or altered file is refused rather than half loaded, and the
values are checked on load (the loss scale a finite float32 > 0 inside the policy's clamps,
the counter in [0, growth_interval)).  Version-2 files, whose checksum covered the tensors
only, still load with a warning; re-saving them writes version 3.  Writes go to a temporary
file in the same directory (mode per the umask), then a rename: a crash mid-save leaves the
previous checkpoint as it was, and the next save to that path removes the crashed save's
temporary file.

Training checkpoints (`save_training_file` / `load_training_file`, called by
``dualprec_torch.checkpoint`` and ``dualprec_jax.checkpoint``) put model parameters (torch
names and layouts), the optimizer state and this precision state in one file of the same
kind; docs/checkpoints.md describes both and the mapping between the frameworks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .errors import CheckpointError, PolicyError

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["FORMAT", "VERSION", "TRAINING_FORMAT", "OPTIMIZER_SLOTS", "save_training_file", "load_training_file", "save", "load", "write_checked", "read_checked", "check_values", "clamped_loss_scale", "save_state", "load_state", "state_to_file", "loadable_extensions",
           "state_from_file", "new_state", "check_state", "StateExtension", "register_state_extension",
           "state_extensions", "register_array_converter"]

FORMAT = "dualprec.precision"
VERSION = 3
_META_KEY = "dualprec"


# ----------------------------------------------------------------------------- the file
# The checksum covers every byte of the file: safetensors' own header (tensor names, dtypes,
# shapes, offsets, the metadata with dualprec's JSON header) and the tensor data.  It lives
# in the metadata entry ``dualprec.sha256`` as 64 hex digits; the digest is the SHA-256 of
# the whole file with those 64 digits read as "0" * 64.  A flip of any bit therefore changes
# the digest, the stored digits, or the entry's key (then the file has no checksum, which a
# dualprec-written file of this version never lacks).
_SUM_KEY = "dualprec.sha256"
_SUM_MARK = b'"' + _SUM_KEY.encode() + b'":"'
_PLACEHOLDER = b"0" * 64
_CHUNK = 1 << 24


def _read_head(f: BinaryIO, size: int, path: str | os.PathLike[str]) -> bytes:
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated: {size} bytes)")
    n = int.from_bytes(raw, "little")
    if n <= 0 or 8 + n > size:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not safetensors: header "
                              f"length {n}, file {size} bytes)")
    return f.read(n)


def _sum_offset(head: bytes) -> int | None:
    """Byte offset (in the file) of the 64 checksum digits, None when the file has no checksum
    entry; CheckpointError when the entry is there but malformed."""
    at = head.find(_SUM_MARK)
    if at < 0:
        return None
    if head.find(_SUM_MARK, at + 1) >= 0:
        raise CheckpointError("two checksum entries in the header; the file was altered")
    start = at + len(_SUM_MARK)
    if head[start + 64:start + 65] != b'"':
        raise CheckpointError("the checksum entry is malformed; the file was altered")
    return 8 + start


def _file_digest(f: BinaryIO, offset: int) -> str:
    """SHA-256 of the open file with the 64 bytes at ``offset`` read as the placeholder."""
    h = hashlib.sha256()
    f.seek(0)
    pos = 0
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        lo, hi = max(offset - pos, 0), min(offset + 64 - pos, len(chunk))
        if lo < hi:
            chunk = chunk[:lo] + _PLACEHOLDER[lo + pos - offset:hi + pos - offset] + chunk[hi:]
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _near_miss(key: str) -> bool:
    """A metadata key one flipped bit away from the checksum key."""
    a, b = key.encode("utf-8", "surrogatepass"), _SUM_KEY.encode()
    return len(a) == len(b) and sum(bin(x ^ y).count("1") for x, y in zip(a, b)) == 1


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no /proc: read it the portable way (and put it back)
    os.umask(old)
    return old


def _host_tag() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _sweep_temps(directory: Path, name: str) -> None:
    """Remove temporary files that saves of ``name`` killed on this host left behind: those
    whose writing process no longer runs (and temps of the older naming, an hour old)."""
    import re
    import time

    ours = re.compile(re.escape(f".{name}.") + r"([0-9a-f]{8})-(\d+)\.[A-Za-z0-9_]+\.tmp")
    older = re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]{8}\.tmp")
    host = _host_tag()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        m = ours.fullmatch(entry.name)
        stale = False
        if m:
            pid = int(m.group(2))
            if m.group(1) == host and pid != os.getpid():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    stale = True
                except (PermissionError, OverflowError, OSError):
                    stale = False
        elif older.fullmatch(entry.name):
            try:
                stale = time.time() - entry.stat().st_mtime > 3600
            except OSError:
                stale = False
        if stale:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def write_checked(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                  metadata: Mapping[str, str] | None = None, *, framework: str = "numpy") -> None:
    """Write a safetensors file with a checksum over the whole file, atomically.

    The file is written to a temporary file in the same directory (mode per the umask),
    fsynced and renamed; every failure removes the temporary file, and temporary files of
    saves killed earlier on this host are removed first.

    Args:
        path: The file to write; missing parent directories are created.
        tensors: Flat name to array (NumPy) or tensor (torch).
        metadata: safetensors metadata entries, stored as strings; the checksum entry
            ``dualprec.sha256`` is added.
        framework: "numpy" (arrays) or "torch" (tensors, bfloat16 included).

    Raises:
        CheckpointError: safetensors did not write the checksum entry.
    """
    save_file: Callable[..., object]  # the NumPy and the torch writer take the same arguments
    if framework == "torch":
        from safetensors.torch import save_file as save_torch_file
        save_file = save_torch_file
    else:
        from safetensors.numpy import save_file as save_numpy_file
        save_file = save_numpy_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_temps(path.parent, path.name)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_SUM_KEY] = _PLACEHOLDER.decode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host_tag()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=meta)
        with open(tmp, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            offset = _sum_offset(_read_head(f, size, tmp))
            if offset is None:  # cannot happen: safetensors writes the metadata it is given
                raise CheckpointError(f"{path}: safetensors did not write the checksum entry")
            digest = _file_digest(f, offset)
            f.seek(offset)
            f.write(digest.encode())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read_checked(path: str | os.PathLike[str], *, require: bool = True,
                 framework: str = "numpy") -> tuple[dict, dict, bool]:
    """Read a safetensors file, verifying dualprec's checksum when it carries one.

    Args:
        path: The file.
        require: Refuse a file without the checksum.  Without ``require``, such a file (one
            torch or bitsandbytes wrote) loads unverified, unless its metadata holds a key
            one bit from the checksum's.
        framework: "numpy" (arrays) or "torch" (tensors).

    Returns:
        ``(metadata, tensors, verified)``: the metadata entries, flat name to array or
        tensor, and whether the checksum was present and matched.

    Raises:
        CheckpointError: The file is missing, truncated or not safetensors, any byte differs
            from what was written, or the checksum is missing under ``require``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            offset = _sum_offset(_read_head(f, size, path))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
        if offset is not None:
            f.seek(offset)
            stored = f.read(64)
            if _file_digest(f, offset).encode() != stored:
                raise CheckpointError(f"{path}: the file does not match its checksum; it was altered or damaged "
                                      "after it was written")
    try:
        with safe_open(str(path), framework="pt" if framework == "torch" else framework) as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not safetensors: "
                              f"{_clip(str(e))})") from None
    verified = offset is not None
    if verified and meta.get(_SUM_KEY) is None:
        raise CheckpointError(f"{path}: the checksum entry is not in the metadata; the file was altered")
    meta.pop(_SUM_KEY, None)
    if not verified and (require or any(_near_miss(k) for k in meta)):
        raise CheckpointError(f"{path}: the file carries no dualprec checksum"
                              f"{' (a metadata key is one bit from it: the file was altered)' if not require else ''}"
                              "; it was not written by this dualprec, or was altered")
    return meta, tensors, verified


def _clip(text: str, n: int = 200) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[:n] + "..."


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    """Version 2's checksum: the tensor bytes only (kept to read version-2 files)."""
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


def _contiguous(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")  # np.ascontiguousarray makes 0-d 1-d


def save(path: str | os.PathLike[str], header: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write a checkpoint file: tensors plus a JSON header, atomically, checksummed (`write_checked`).

    Args:
        path: The file to write.
        header: JSON-ready; must hold "format", "version" and "policy".
        tensors: Flat name to array.

    Raises:
        CheckpointError: The header lacks one of the required keys.
    """
    for key in ("format", "version", "policy"):
        if key not in header:
            raise CheckpointError(f"checkpoint header needs {key!r}")
    arrays = {str(k): _storable(v) for k, v in tensors.items()}
    head = {k: v for k, v in header.items() if k != "sha256"}
    write_checked(path, arrays, {_META_KEY: json.dumps(head, sort_keys=True)})


def load(path: str | os.PathLike[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a file `save` wrote, after verifying its checksum.

    A version-2 file (its checksum covers the tensors, not the header) loads with a
    UserWarning; re-saving it writes the current version.

    Args:
        path: The file.

    Returns:
        ``(header, tensors)``: the JSON header as a dict, and flat name to array.

    Raises:
        CheckpointError: The file is missing, is not a dualprec checkpoint, is truncated,
            or any byte differs from what was written.
    """
    path = Path(path)
    meta, tensors, verified = read_checked(path, require=False)
    if _META_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file without a dualprec header; not a precision checkpoint")
    try:
        header = json.loads(meta[_META_KEY], object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the dualprec header is not valid JSON ({_clip(str(e))}); the file was "
                              "altered") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the dualprec header is not a JSON object; the file was altered")
    if verified:
        if "sha256" in header:
            raise CheckpointError(f"{path}: the header carries a second checksum; the file was altered")
        return header, tensors
    digest = header.pop("sha256", None)
    if header.get("version") != 2 or not isinstance(digest, str):
        raise CheckpointError(f"{path}: the file carries no checksum; it was altered, or was not written by dualprec")
    if digest != _digest(tensors):
        raise CheckpointError(f"{path}: the tensors do not match the checksum in the header; the file was "
                              "altered or damaged after it was written")
    import warnings

    warnings.warn(f"{path}: a version-2 precision checkpoint, whose checksum covers the tensors but not the "
                  "header; it loads, but re-save it (dualprec.checkpoint.save_state(path, load_state(path))) "
                  "so the checksum covers the whole file", UserWarning, stacklevel=3)
    return header, tensors


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    from .serialize import unique_keys

    return unique_keys(pairs, ValueError, "checkpoint header")


# ------------------------------------------------------------------ the precision state
@dataclasses.dataclass(frozen=True)
class StateExtension:
    """State a feature module keeps for one backend (FP8 scales, quantized weights).

    ``state_tensors(target)`` returns flat name -> NumPy array; ``load_state_tensors(target,
    tensors)`` restores them and returns the target (or None when it restores in place).
    The target is what the backend's Precision hands over: the torch model given to
    ``setup``, the JAX variables passed to ``state_dict`` / ``load_state_dict``.

    Attributes:
        name: The extension's name, the key of its state in a checkpoint ("fp8", ...).
        backend: "torch" or "jax".
        state_tensors: ``state_tensors(target)``: flat name to NumPy array.
        load_state_tensors: ``load_state_tensors(target, tensors)``: restores them.
    """

    name: str
    backend: str
    state_tensors: Callable[[Any], dict]
    load_state_tensors: Callable[[Any, dict], Any]


_EXTENSIONS: dict[tuple[str, str], StateExtension] = {}


def register_state_extension(backend: str, name: str, state_tensors: Callable[[Any], dict],
                             load_state_tensors: Callable[[Any, dict], Any]) -> None:
    """Declare state a feature module keeps, so the backend's Precision carries it in checkpoints.

    One line in the feature module: ``register_state_extension("torch", "fp8",
    state_tensors, load_state_tensors)``.

    Args:
        backend: "torch" or "jax".
        name: The extension's name, the key of its state in a checkpoint.
        state_tensors: ``state_tensors(target)`` returns flat name to NumPy array.
        load_state_tensors: ``load_state_tensors(target, tensors)`` restores them and
            returns the target (or None when it restores in place).
    """
    _EXTENSIONS[(backend, name)] = StateExtension(name, backend, state_tensors, load_state_tensors)


def state_extensions(backend: str) -> dict[str, StateExtension]:
    """The state extensions a backend's feature modules registered.

    Args:
        backend: "torch" or "jax".

    Returns:
        Extension name to StateExtension.
    """
    return {name: ext for (b, name), ext in _EXTENSIONS.items() if b == backend}


def loadable_extensions(backend: str, saved: Mapping[str, Mapping], strict: bool) -> list[tuple[StateExtension, Mapping]]:
    """Pair each extension state of a checkpoint with the backend's module for it.

    Args:
        backend: "torch" or "jax".
        saved: The checkpoint's ``extensions``: extension name to its tensors.
        strict: Refuse an extension state the backend has no module for (otherwise it is dropped).

    Returns:
        ``(extension, tensors)`` for each saved state the backend has a module for.

    Raises:
        CheckpointError: Under ``strict``, naming a state no module is registered for.
    """
    known = state_extensions(backend)
    out = []
    for name, tensors in saved.items():
        if name in known:
            out.append((known[name], tensors))
        elif strict:
            raise CheckpointError(f"the checkpoint carries {name!r} state, which dualprec_{backend} has no "
                                  "module registered for; pass strict=False to drop it")
    return out


def new_state(policy: Any, scale: float, counter: int, masters: Mapping[str, np.ndarray] | None = None,
              extensions: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict:
    """The backend-neutral precision state dict both backends produce and accept.

    Args:
        policy: The policy, in any form `Policy.parse` takes; stored as its canonical string.
        scale: The current loss scale (stored as float32).
        counter: The dynamic loss scale's count of finite steps since the last change.
        masters: Parameter name to float32 master weight (NumPy, or torch tensors:
            `state_to_file` converts them).
        extensions: Extension name to its flat tensors.

    Returns:
        The state dict: ``format``, ``version``, ``policy``, ``loss_scale``,
        ``master_weights`` and ``extensions``.
    """
    from .policy import Policy

    return {"format": FORMAT, "version": VERSION, "policy": str(Policy.parse(policy)),
            "loss_scale": {"scale": float(np.float32(scale)), "counter": int(counter)},
            "master_weights": dict(masters or {}), "extensions": {k: dict(v) for k, v in (extensions or {}).items()}}


def check_state(state: Any, policy: Policy | None, strict: bool, what: str = "load_state_dict") -> Policy:
    """Check a precision state dict before a backend loads it.

    Args:
        state: The state dict.
        policy: The policy of the Precision loading it (None: no comparison).
        strict: The saved policy must equal ``policy`` (otherwise only what both share loads).
        what: The caller named at the start of the error message.

    Returns:
        The saved Policy.

    Raises:
        CheckpointError: Not a dualprec precision state (a GradScaler state dict is named as
            such), a version this dualprec does not read, a policy that does not parse,
            loss-scale values the policy cannot produce, or, under ``strict``, another policy.
    """
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
    try:
        saved = Policy.parse(state["policy"])
    except CheckpointError:
        raise
    except (PolicyError, KeyError) as e:
        raise CheckpointError(f"{what}: the state's policy does not parse ({_clip(str(e))})") from None
    check_values(state, saved, what)
    if strict and saved != policy:
        raise CheckpointError(f'{what}: this checkpoint was written under policy "{saved}", this Precision '
                              f'runs "{policy}"; resume with Precision("{saved}"), or pass strict=False to '
                              "take only the parts both policies share")
    return saved


def check_values(state: Mapping, policy: Policy, what: str = "load_state_dict") -> None:
    """Check that a state's loss-scale values are ones the policy produces.

    Args:
        state: The precision state dict.
        policy: The policy it was saved under.
        what: The caller named at the start of the error message.

    Raises:
        CheckpointError: Naming the field, unless the scale is a finite float32 > 0 inside
            the policy's clamps and the counter an integer in [0, growth_interval) (0
            without dynamic scaling).
    """
    ls = state.get("loss_scale")
    if not isinstance(ls, Mapping) or "scale" not in ls or "counter" not in ls:
        raise CheckpointError(f"{what}: loss_scale must be a mapping with scale and counter, got {_clip(repr(ls))}")
    try:
        scale = float(np.asarray(_to_numpy(ls["scale"]), dtype=np.float64))
        counter_f = float(np.asarray(_to_numpy(ls["counter"]), dtype=np.float64))
    except (TypeError, ValueError):
        raise CheckpointError(f"{what}: loss_scale.scale and loss_scale.counter must be numbers, got "
                              f"{_clip(repr(ls['scale']))}, {_clip(repr(ls['counter']))}") from None
    cfg = policy.loss_scale
    with np.errstate(over="ignore"):
        s32 = float(np.float32(scale))
    lo = float(np.float32(cfg.min_scale)) if cfg.enabled and cfg.min_scale is not None else None
    hi = float(np.float32(cfg.max_scale)) if cfg.enabled and cfg.max_scale is not None else None
    if not (math.isfinite(s32) and s32 > 0) or (lo is not None and s32 < lo) or (hi is not None and s32 > hi):
        where = f"[{lo if lo is not None else 'tiny'}, {hi if hi is not None else '3.4e38'}]"
        raise CheckpointError(f"{what}: loss_scale.scale {scale!r} is outside the valid range: a finite float32 > 0 "
                              f"in {where}")
    top = cfg.growth_interval - 1 if cfg.kind == "dynamic" else 0
    if not (counter_f.is_integer() and 0 <= counter_f <= top):
        raise CheckpointError(f"{what}: loss_scale.counter {_clip(repr(ls['counter']))} is outside the valid range: "
                              f"an integer in [0, {top}] under loss_scale={cfg.kind}")


def clamped_loss_scale(loss_scale: Mapping, policy: Policy) -> dict:
    """The saved loss-scale state as a backend loads it under a policy; both backends apply
    this at load, so they agree from the first step on.

    Args:
        loss_scale: The saved ``{"scale", "counter"}``.
        policy: The policy of the Precision loading it.

    Returns:
        ``{"scale", "counter"}``; under dynamic scaling the scale is clamped to the policy's
        ``min``/``max`` and to [2**-126, 2**126] (a strict=False resume from another policy,
        or an older file, may bring one outside them) and the counter cut to
        ``growth_interval - 1``.
    """
    cfg = policy.loss_scale
    scale = np.float32(float(np.asarray(_to_numpy(loss_scale["scale"]))))
    counter = int(np.asarray(_to_numpy(loss_scale["counter"])))
    if cfg.kind == "dynamic":
        from .ref.loss_scale import scale_bounds

        lo, hi = scale_bounds(cfg)  # the policy's min/max inside [2**-126, 2**126]
        scale = min(max(scale, np.float32(lo)), np.float32(hi))
        counter = min(counter, cfg.growth_interval - 1)
    return {"scale": float(scale), "counter": counter}


_ARRAY_CONVERTERS: list[Callable[[Any], "np.ndarray | None"]] = []


def register_array_converter(convert: Callable[[Any], "np.ndarray | None"]) -> None:
    """Declare how a backend's tensors become NumPy arrays in a checkpoint.

    The spec layer imports no framework; a backend registers, when it is imported, the one
    conversion its tensors need (``dualprec_torch`` registers torch's: bfloat16 tensors
    through their 16-bit patterns, so every bit survives).

    Args:
        convert: ``convert(x)`` returns a NumPy array for a tensor of its framework, None for
            anything else.
    """
    _ARRAY_CONVERTERS.append(convert)


def _to_numpy(x: Any) -> np.ndarray:
    for convert in _ARRAY_CONVERTERS:
        out = convert(x)
        if out is not None:
            return out
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor, converted without importing torch
        if str(getattr(x, "dtype", "")).endswith("bfloat16"):
            raise CheckpointError("a torch bfloat16 tensor has no NumPy form without dualprec_torch: import "
                                  "dualprec_torch first (it registers the bit-exact conversion), or pass "
                                  "NumPy arrays (ml_dtypes.bfloat16)")
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


def state_to_file(state: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
    """Lay a precision state dict out as a checkpoint file's contents.

    Args:
        state: The precision state dict.

    Returns:
        ``(header, tensors)`` for `save`: flat tensor names, bfloat16 stored as its uint16 bits.

    Raises:
        CheckpointError: ``state`` is not a valid precision state, or an extension reuses a
            tensor name.
    """
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
    """Rebuild a precision state dict from a checkpoint file's contents.

    Args:
        header: The header `load` read.
        tensors: The flat tensors `load` read.

    Returns:
        The precision state dict.

    Raises:
        CheckpointError: Naming the entry when the header's structure or the tensors do not
            fit together.
    """
    if header.get("format") != FORMAT:
        raise CheckpointError(f"not a precision checkpoint: format {_clip(repr(header.get('format')))}, "
                              f"expected {FORMAT!r}")
    policy = header.get("policy")
    if not isinstance(policy, str):
        raise CheckpointError(f"checkpoint header: policy must be a string, got {_clip(repr(policy))}")
    names = {}
    for key in ("masters", "bfloat16"):
        value = header.get(key, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise CheckpointError(f"checkpoint header: {key} must be a list of names, got {_clip(repr(value))}")
        names[key] = value
    exts = header.get("extensions", {})
    if not (isinstance(exts, dict) and all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                                           for v in exts.values())):
        raise CheckpointError(f"checkpoint header: extensions must map names to lists of tensor names, got "
                              f"{_clip(repr(exts))}")
    tensors = dict(tensors)
    listed = {"loss_scale.scale", "loss_scale.counter"} | {f"master.{n}" for n in names["masters"]}
    listed |= {n for v in exts.values() for n in v}
    unlisted = sorted(set(tensors) - listed)
    if unlisted:
        raise CheckpointError(f"precision checkpoint holds tensors its header does not list: {_clip(repr(unlisted))}")
    for n in names["bfloat16"]:
        import ml_dtypes

        if n not in tensors or tensors[n].dtype != np.uint16:
            raise CheckpointError(f"checkpoint header lists {n!r} as bfloat16, but the file holds no uint16 "
                                  "tensor of that name")
        tensors[n] = tensors[n].view(ml_dtypes.bfloat16)
    try:
        scale, counter = tensors["loss_scale.scale"], tensors["loss_scale.counter"]
        masters = {name: tensors[f"master.{name}"] for name in names["masters"]}
        ext_tensors = {ext: {n: tensors[n] for n in ns} for ext, ns in exts.items()}
    except KeyError as e:
        raise CheckpointError(f"precision checkpoint lacks the tensor {e.args[0]!r} its header lists") from None
    if scale.shape != () or scale.dtype != np.float32:
        raise CheckpointError(f"loss_scale.scale must be a float32 scalar, got {scale.dtype} {scale.shape}")
    if counter.shape != () or counter.dtype != np.int32:
        raise CheckpointError(f"loss_scale.counter must be an int32 scalar, got {counter.dtype} {counter.shape}")
    try:
        state = new_state(policy, float(scale), int(counter), masters, ext_tensors)
    except CheckpointError:
        raise
    except PolicyError as e:
        raise CheckpointError(f"checkpoint header: the policy does not parse ({_clip(str(e))})") from None
    state["version"] = header.get("version")
    check_state(state, None, strict=False, what="load_state")
    return state


def save_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write a precision state dict to one checkpoint file that either backend loads.

    Args:
        path: The file to write.
        state: torch's ``precision.state_dict()`` or JAX's ``precision.state_dict(opt_state)``.

    Raises:
        CheckpointError: ``state`` is not a precision state dict.
    """
    save(path, *state_to_file(state))


def load_state(path: str | os.PathLike[str]) -> dict:
    """Read the precision state dict `save_state` wrote.

    Args:
        path: The file.

    Returns:
        The precision state dict (format, version, policy string, loss-scale state, master
        weights, extension states), which either backend's ``load_state_dict`` takes.

    Raises:
        CheckpointError: The file is missing, altered, truncated, of another format or
            version, or holds values its policy cannot have.
    """
    return state_from_file(*load(path))


# --------------------------------------------------------------- the training checkpoint
TRAINING_FORMAT = "dualprec.training"
TRAINING_VERSION = 1
#: optimizer kinds a training checkpoint carries, and the state slots of each (torch's names)
OPTIMIZER_SLOTS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",), "none": ()}


def _flat_with_bf16(prefix: str, arrays: Mapping[str, Any], out: dict, bf16: list) -> None:
    for name, a in arrays.items():
        a = _to_numpy(a)
        key = f"{prefix}{name}"
        if key in out:
            raise CheckpointError(f"save_training: the tensor name {key!r} is used twice")
        if a.dtype.name == "bfloat16":  # safetensors' NumPy side has no bfloat16: stored as its bits
            a = a.view(np.uint16)
            bf16.append(key)
        out[key] = _storable(a)


def save_training_file(path: str | os.PathLike[str], params: Mapping[str, Any], optimizer: Mapping[str, Any],
                       precision: Mapping[str, Any]) -> None:
    """Write one training checkpoint: parameters, optimizer state and precision state in one
    safetensors file, the checksum over all of it (``dualprec_torch.checkpoint`` and
    ``dualprec_jax.checkpoint`` call this).

    Args:
        path: The file to write.
        params: torch parameter name to array (NumPy or torch; bfloat16 kept), torch layout.
        optimizer: ``{"kind": "adam" | "sgd" | "none", "step": int, "slots": {slot: {name:
            array}}}``, slots named as torch names them (`OPTIMIZER_SLOTS`), arrays in torch layout.
        precision: A precision state dict.

    Raises:
        CheckpointError: An unknown optimizer kind, a step outside [0, 2**31-1], the wrong
            slots for the kind, slot entries for names that are not parameters, or a name
            used twice.
    """
    kind = optimizer.get("kind")
    if kind not in OPTIMIZER_SLOTS:
        raise CheckpointError(f"save_training: optimizer kind {kind!r}; one of {', '.join(OPTIMIZER_SLOTS)}")
    step = int(optimizer.get("step", 0))
    if not 0 <= step < 2**31:
        raise CheckpointError(f"save_training: optimizer step {step} is outside [0, 2**31-1]")
    slots = optimizer.get("slots", {})
    if set(slots) != set(OPTIMIZER_SLOTS[kind]):
        raise CheckpointError(f"save_training: a {kind} optimizer has the slots {OPTIMIZER_SLOTS[kind]}, got "
                              f"{sorted(slots)}")
    tensors: dict = {}
    bf16: list = []
    _flat_with_bf16("model.", params, tensors, bf16)
    for slot, arrays in slots.items():
        unknown = sorted(set(arrays) - set(params))
        if unknown:
            raise CheckpointError(f"save_training: optimizer state for {unknown}, which are not model parameters")
        _flat_with_bf16(f"optim.{slot}.", arrays, tensors, bf16)
    p_header, p_tensors = state_to_file(precision)
    _flat_with_bf16("precision.", p_tensors, tensors, [])
    header = {"format": TRAINING_FORMAT, "version": TRAINING_VERSION, "params": sorted(params),
              "optimizer": {"kind": kind, "step": step, "slots": {s: sorted(a) for s, a in slots.items()}},
              "precision": p_header, "bfloat16": sorted(bf16)}
    write_checked(path, tensors, {_META_KEY: json.dumps(header, sort_keys=True)})


def load_training_file(path: str | os.PathLike[str]) -> dict:
    """Read a training checkpoint `save_training_file` wrote, after checking its checksum
    and structure.

    Args:
        path: The file.

    Returns:
        ``{"params", "optimizer", "precision"}`` in the forms `save_training_file` takes,
        arrays as NumPy (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
        CheckpointError: The file is missing, altered or truncated, is not a training
            checkpoint (a precision checkpoint is named as such), is of another version,
            or its header and tensors disagree.
    """
    import ml_dtypes

    path = Path(path)
    meta, tensors, _ = read_checked(path, require=True)
    try:
        header = json.loads(meta.get(_META_KEY, ""), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a training checkpoint (no valid dualprec header)") from None
    if not isinstance(header, dict) or header.get("format") != TRAINING_FORMAT:
        what = header.get("format") if isinstance(header, dict) else None
        hint = " (a precision checkpoint: load it with load_state)" if what == FORMAT else ""
        raise CheckpointError(f"{path}: not a training checkpoint: format {_clip(repr(what))}{hint}")
    if header.get("version") != TRAINING_VERSION:
        raise CheckpointError(f"{path}: training checkpoint version {_clip(repr(header.get('version')))}; this "
                              f"dualprec reads version {TRAINING_VERSION}")
    for n in header.get("bfloat16", []):
        if n not in tensors or tensors[n].dtype != np.uint16:
            raise CheckpointError(f"{path}: the header lists {n!r} as bfloat16, but the file has no such uint16 tensor")
        tensors[n] = tensors[n].view(ml_dtypes.bfloat16)
    opt = header.get("optimizer", {})
    kind = opt.get("kind")
    if kind not in OPTIMIZER_SLOTS or not isinstance(opt.get("step"), int) or not 0 <= opt["step"] < 2**31:
        raise CheckpointError(f"{path}: optimizer entry {_clip(repr(opt))} is not valid")
    try:
        params = {n: tensors.pop(f"model.{n}") for n in header["params"]}
        slots = {s: {n: tensors.pop(f"optim.{s}.{n}") for n in names} for s, names in opt["slots"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: the header lists the tensor {_clip(str(e))}, which the file lacks") from None
    if set(slots) != set(OPTIMIZER_SLOTS[kind]):
        raise CheckpointError(f"{path}: a {kind} optimizer with slots {sorted(slots)}")
    rest = {k[len("precision."):]: v for k, v in tensors.items() if k.startswith("precision.")}
    extra = sorted(k for k in tensors if not k.startswith("precision."))
    if extra:
        raise CheckpointError(f"{path}: tensors the header does not list: {_clip(repr(extra))}")
    precision = state_from_file(header.get("precision", {}), rest)
    return {"params": params, "optimizer": {"kind": kind, "step": opt["step"], "slots": slots},
            "precision": precision}
