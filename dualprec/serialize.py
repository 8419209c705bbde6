"""Policy <-> dict, JSON and TOML, with a schema version.  Loading never executes code."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import PolicyError, did_you_mean
from .policy import SCHEMA_VERSION, FP8Recipe, LossScaleConfig, Policy, Quantization

__all__ = ["policy_to_dict", "policy_from_dict", "policy_to_json", "policy_from_json",
           "load_policy", "save_policy", "component_from_dict"]

_TOP_KEYS = ("schema_version", "param_dtype", "compute_dtype", "output_dtype", "reduce_dtype",
             "loss_scale", "quantization", "fp8", "master_weights", "nonfinite", "overrides")


def policy_to_dict(p: Policy, *, _nested: bool = False) -> dict:
    d: dict[str, Any] = {} if _nested else {"schema_version": SCHEMA_VERSION}
    d.update(param_dtype=p.param_dtype, compute_dtype=p.compute_dtype, output_dtype=p.output_dtype,
             reduce_dtype=p.reduce_dtype, loss_scale=p.loss_scale.to_dict(),
             quantization=None if p.quantization is None else p.quantization.to_dict(),
             fp8=None if p.fp8 is None else p.fp8.to_dict(), master_weights=p.master_weights,
             nonfinite=p.nonfinite,
             overrides=[{"pattern": pat, "policy": policy_to_dict(sub, _nested=True)}
                        for pat, sub in p.overrides])
    return d


def policy_from_dict(data: Mapping, *, _nested: bool = False) -> Policy:
    if not isinstance(data, Mapping):
        raise PolicyError(f"a policy dict must be a mapping, got {type(data).__name__}")
    if not _nested:
        _check_version(data.get("schema_version", SCHEMA_VERSION))
    _check_keys(data, _TOP_KEYS, "policy")
    kwargs: dict[str, Any] = {}
    for key in ("param_dtype", "compute_dtype", "output_dtype", "reduce_dtype", "master_weights", "nonfinite"):
        if key in data:
            kwargs[key] = data[key]
    if data.get("loss_scale") is not None:
        kwargs["loss_scale"] = component_from_dict(LossScaleConfig, data["loss_scale"], "loss_scale")
    for key, cls in (("quantization", Quantization), ("fp8", FP8Recipe)):
        if data.get(key) is not None:
            kwargs[key] = component_from_dict(cls, data[key], key)
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise PolicyError("overrides must be a list of {pattern, policy} tables")
    pairs = []
    for entry in overrides:
        if not isinstance(entry, Mapping):
            raise PolicyError(f"overrides: each entry needs pattern and policy, got {entry!r}")
        _check_keys(entry, ("pattern", "policy"), "overrides entry")
        if "pattern" not in entry or "policy" not in entry:
            raise PolicyError(f"overrides: each entry needs pattern and policy, got {dict(entry)!r}")
        sub = entry["policy"]
        sub = policy_from_dict(sub, _nested=True) if isinstance(sub, Mapping) else Policy.parse(sub)
        pairs.append((entry["pattern"], sub))
    kwargs["overrides"] = tuple(pairs)
    return Policy(**kwargs)


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PolicyError(f"schema_version must be a positive int, got {version!r}")
    if version > SCHEMA_VERSION:
        raise PolicyError(f"schema_version {version} was written by a newer dualprec (this one reads "
                          f"<= {SCHEMA_VERSION}); upgrade dualprec")


def component_from_dict(cls: type[LossScaleConfig] | type[Quantization] | type[FP8Recipe], data: Mapping,
                        what: str) -> LossScaleConfig | Quantization | FP8Recipe:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{what} must be a table/dict, got {data!r}")
    fields = tuple(cls.__dataclass_fields__)
    _check_keys(data, fields, what)
    first = fields[0]
    if first not in data and cls is not LossScaleConfig and cls is not FP8Recipe:
        raise PolicyError(f"{what} needs '{first}'")
    kwargs = dict(data)
    if "skip" in kwargs:
        kwargs["skip"] = tuple(kwargs["skip"]) if isinstance(kwargs["skip"], (list, tuple)) else kwargs["skip"]
    return cls(**kwargs)


def _check_keys(data: Mapping, allowed: tuple[str, ...], what: str) -> None:
    for key in data:
        if key not in allowed:
            raise PolicyError(f'{what}: unknown key "{key}"{did_you_mean(str(key), allowed)}; '
                              f"keys are {', '.join(allowed)}")


def policy_to_json(p: Policy, **kwargs: Any) -> str:
    kwargs.setdefault("indent", 2)
    return json.dumps(policy_to_dict(p), **kwargs)


def policy_from_json(text: str) -> Policy:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise PolicyError(f"not valid JSON: {e}") from None
    except RecursionError:
        raise PolicyError("not a policy: the JSON is nested too deeply") from None
    return _from_document(data, "JSON")


def unique_keys(pairs: list[tuple[str, Any]], error: type[Exception] = ValueError, what: str = "JSON") -> dict:
    """``json.loads``'s object_pairs_hook that refuses a key given twice in one object (JSON
    itself keeps the last one silently); ``error`` is the exception raised."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise error(f'{what}: the key "{key}" appears twice in one object; give each key once')
        out[key] = value
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    return unique_keys(pairs, PolicyError, "JSON policy")


def _from_document(data: Any, what: str) -> Policy:
    """A file holds a policy dict, or {"policy": "<string>"}, or [tool.dualprec] in pyproject."""
    if isinstance(data, Mapping) and "tool" in data and isinstance(data["tool"], Mapping):
        data = data["tool"].get("dualprec", data)
    if isinstance(data, Mapping) and set(data) <= {"policy", "schema_version"} and "policy" in data:
        if "schema_version" in data:
            _check_version(data["schema_version"])
        return Policy.parse(data["policy"])
    if isinstance(data, Mapping) and "schema_version" not in data:
        raise PolicyError(f"{what} policy has no schema_version; files written by Policy.save have one "
                          "(or use {\"policy\": \"bf16-mixed\"})")
    return policy_from_dict(data)


def _drop_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def save_policy(p: Policy, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(policy_to_json(p) + "\n")
    elif path.suffix == ".toml":
        import tomli_w

        path.write_text(tomli_w.dumps(_drop_none(policy_to_dict(p))))
    else:
        raise PolicyError(f"{path}: unknown suffix {path.suffix!r}; use .json or .toml")


def load_policy(path: str | os.PathLike[str]) -> Policy:
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: no such file")
    text = path.read_text()
    if path.suffix == ".json":
        return policy_from_json(text)
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{path}: not valid TOML: {e}") from None
        return _from_document(data, "TOML")
    raise PolicyError(f"{path}: unknown suffix {path.suffix!r}; use .json or .toml")
