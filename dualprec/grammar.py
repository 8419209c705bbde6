"""The policy string grammar: one parser for every dialect, one formatter for canonical names.

Accepted, in the order they are tried:

* an int 16 / 32 / 64 (Fabric) or a preset name or alias from the preset table;
* a Keras quantized name ``int8_from_<policy>`` or ``float8_from_<policy>``;
* the explicit form: comma-separated ``key=value`` items (jmp's grammar, extended).  The
  first item may be a bare preset name, which the items after it modify; without one the
  jmp cascade fills unspecified dtypes (params float32, compute = params, output = compute,
  reduce = params).  ``@pattern=VALUE`` adds a per-module override whose VALUE is a preset
  or a parenthesised list of changes to the surrounding policy.

Names, keys and modes are case-insensitive and whitespace around tokens is ignored; module
path patterns keep their case.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from .dtypes import canonical_dtype
from .errors import PolicyError, did_you_mean
from .policy import ALL_FP8_SCALINGS, QUANT_MODES, FP8Recipe, LossScaleConfig, Policy, Quantization, _replace

__all__ = ["parse_policy", "format_policy", "explicit_form", "parse_component", "wrap_policy", "KEYS"]

#: canonical key -> accepted spellings
KEYS = {
    "params": ("params", "p", "param", "param_dtype"),
    "compute": ("compute", "c", "compute_dtype"),
    "output": ("output", "o", "output_dtype"),
    "reduce": ("reduce", "r", "reduce_dtype"),
    "loss_scale": ("loss_scale", "ls", "loss"),
    "quant": ("quant", "q", "quantization"),
    "fp8": ("fp8",),
    "master": ("master", "master_weights"),
    "nonfinite": ("nonfinite", "non_finite", "nan"),
}
_KEY_OF = {alias: key for key, aliases in KEYS.items() for alias in aliases}
_FIELD_OF_KEY = {"params": "param_dtype", "compute": "compute_dtype", "output": "output_dtype",
                 "reduce": "reduce_dtype", "loss_scale": "loss_scale", "quant": "quantization",
                 "fp8": "fp8", "master": "master_weights", "nonfinite": "nonfinite"}

_LOSS_ARGS = {"init": "init_scale", "init_scale": "init_scale", "scale": "init_scale",
              "growth": "growth_factor", "growth_factor": "growth_factor",
              "backoff": "backoff_factor", "backoff_factor": "backoff_factor",
              "interval": "growth_interval", "growth_interval": "growth_interval",
              "min": "min_scale", "min_scale": "min_scale", "max": "max_scale", "max_scale": "max_scale"}
_QUANT_ARGS = {"blocksize": "blocksize", "block_size": "blocksize", "bs": "blocksize",
               "threshold": "threshold", "skip": "skip"}
_FP8_ARGS = {"history": "history_len", "history_len": "history_len", "amax_history_len": "history_len",
             "margin": "margin", "algo": "amax_algo", "amax_algo": "amax_algo",
             "amax_compute_algo": "amax_algo", "format": "format", "fp8_format": "format", "engine": "engine"}
# block-scaled recipes (mxfp8 rounding; nvfp4 options): docs/block-scaling.md
_FP8_ARGS.update({"rounding": "rounding", "scale_rounding": "rounding", "sr": "sr",
                  "stochastic_rounding": "sr", "rht": "rht", "hadamard": "rht",
                  "weight_blocks": "weight_blocks", "wblocks": "weight_blocks"})
_BOOL_ARGS = {"sr", "rht"}
_INT_ARGS = {"growth_interval", "blocksize", "history_len", "margin"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

# ASCII digits only: "\d" alone also matches "٣٢", which float() reads as 32
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_POWER = re.compile(r"(\d+)\s*(\*\*|\^)\s*([+-]?\d+)", re.ASCII)
_CALL = re.compile(r"([A-Za-z0-9_\-]+)\s*(\((.*)\))?", re.S | re.ASCII)
#: longer policy strings are refused before parsing (the longest real ones are a few hundred)
MAX_POLICY_LENGTH = 4096
_MAX_NUMBER_LENGTH = 64


# ----------------------------------------------------------------------------- parsing
def parse_policy(value: Any) -> Policy:
    """Build a Policy from any of its spellings (what `Policy.parse` runs).

    Args:
        value: A policy string (a preset name or alias, a jmp string, a Keras name, or the
            explicit "key=value,..." form with ``@pattern=`` overrides, optionally after a
            base name), a Lightning Fabric int (16, 32 or 64), a dict as `Policy.to_dict`
            writes it, or a Policy (returned as is).

    Returns:
        The validated Policy.

    Raises:
        PolicyError: ``value`` is no policy (a bool, a float, another type, an empty or
            overlong string, an unknown name or key, a bad value); the message names the
            offending token and the nearest valid spelling.
    """
    if isinstance(value, Policy):
        return value
    if isinstance(value, bool):
        raise PolicyError(f"precision {value!r} is a bool; use a string such as 'bf16-mixed'")
    if isinstance(value, int):
        if value in (16, 32, 64):
            return _preset(str(value))
        raise PolicyError(f"precision {value} is not a Fabric precision; use 16, 32 or 64 "
                          "(or a string such as 'bf16-mixed')")
    if isinstance(value, float):
        hint = f" (did you mean {int(value)}?)" if value in (16.0, 32.0, 64.0) else ""
        raise PolicyError(f"precision {value!r} is a float; give an int or a string{hint}")
    if isinstance(value, dict):
        return Policy.from_dict(value)
    if not isinstance(value, str):
        raise PolicyError(f"cannot make a policy from {type(value).__name__} {value!r}; "
                          "pass a string, an int, a dict or a Policy")
    if len(value) > MAX_POLICY_LENGTH:
        raise PolicyError(f"a policy string of {len(value)} characters is too long (at most {MAX_POLICY_LENGTH}); "
                          f"it starts {value[:40]!r}")
    text = value.strip()
    if not text:
        raise PolicyError("empty policy string; try 'bf16-mixed' or see `dualprec presets`")
    if "=" not in text and "," not in text:
        return _parse_name(text)
    return _parse_explicit(text)


def _preset(name: str) -> Policy:
    from .presets import lookup_preset

    row = lookup_preset(name)
    assert row is not None
    return row.policy


def _parse_name(text: str) -> Policy:
    from .presets import AMBIGUOUS, lookup_preset, preset_names

    name = text.lower()
    row = lookup_preset(name)
    if row is not None:
        return row.policy
    if name in AMBIGUOUS:
        raise PolicyError(f'"{text}": {AMBIGUOUS[name]}')
    for prefix, extra in (("int8_from_", {"quantization": Quantization("int8", threshold=0.0)}),
                          ("float8_from_", {"fp8": FP8Recipe("delayed")})):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(("int8_from_", "float8_from_", "int4_from_")):
                raise PolicyError(f'"{text}": a Keras quantized name takes one prefix (int8_from_ or float8_from_) '
                                  f'before a policy name, e.g. "{prefix}mixed_bfloat16"')
            base = _parse_name(text[len(prefix):])
            return _replace(base, **extra)
    if name.startswith("int4_from_"):
        raise PolicyError(f'"{text}": Keras int4 is per-channel int4, which dualprec does not implement; '
                          f'the nearest is "{name[len("int4_from_"):]},quant=nf4"')
    if _NUMBER.fullmatch(name):
        raise PolicyError(f'"{text}" is not a precision; numbers must be the ints 16, 32 or 64 '
                          '("16" means 16-mixed)')
    from .spellings import suggestion

    hint = suggestion(name) or did_you_mean(name, preset_names())  # what people type first, then the nearest
    raise PolicyError(f'unknown policy "{text}"{hint}; '
                      "`dualprec presets` lists the names, or write params=...,compute=...")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses; unbalanced parentheses are an error."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PolicyError(f"unbalanced ')' at position {i} in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise PolicyError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _split_item(item: str, whole: str) -> tuple[str, str]:
    if not item:
        raise PolicyError(f"empty item (two commas in a row, or a trailing comma) in {whole!r}")
    depth = 0
    for i, ch in enumerate(item):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "=" and depth == 0:
            key, value = item[:i].strip(), item[i + 1:].strip()
            if not key or not value:
                raise PolicyError(f"item {item!r} in {whole!r} needs the form key=value")
            return key, value
    raise PolicyError(f"item {item!r} in {whole!r} is not key=value; a bare name may only come first "
                      "(a preset to modify, e.g. 'bf16-mixed,quant=nf4')")


def _parse_explicit(text: str) -> Policy:
    items = _split_top(text)
    base, base_item = None, []
    if items and "=" not in items[0]:
        base_item = [items[0]]
        base = _parse_name(items[0])
        if base.overrides:
            raise PolicyError(f"{items[0]!r} has overrides and cannot be a base")
        items = items[1:]
    fields: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for item in items:
        key, value = _split_item(item, text)
        if key.startswith("@"):
            pattern = key[1:].strip()
            overrides.append((pattern, value))
            continue
        canon = _KEY_OF.get(key.lower())
        if canon is None:
            raise PolicyError(f'unknown key "{key}" in {text!r}{did_you_mean(key, _KEY_OF)}; '
                              f"keys are {', '.join(KEYS)} and @pattern")
        if canon in seen:
            raise PolicyError(f'key "{key}" repeats "{seen[canon]}" in {text!r}; give each setting once')
        seen[canon] = key
        fields[_FIELD_OF_KEY[canon]] = _parse_value(canon, value)
    if base is None:
        parent = Policy(**fields)
    else:
        parent = _replace(base, **fields)
    if not overrides:
        return parent
    _refuse_ambiguous(items, text, base_item)
    resolved: list[tuple[str, Policy]] = []
    for pattern, value in overrides:
        if value.startswith("(") and value.endswith(")"):
            inner = value[1:-1].strip()
            resolved.append((pattern, _parse_relative(parent, inner, f"@{pattern}")))
        else:
            resolved.append((pattern, parse_policy(value)))
    return _replace(parent, overrides=tuple(resolved))


def _refuse_ambiguous(items: list[str], whole: str, base: list[str]) -> None:
    """``@head=p=f32,c=f32``: does c=f32 belong to head or to the whole policy?  An override
    whose value is itself key=value, followed by more key=value items, could mean either."""
    for i, item in enumerate(items):
        key, value = _split_item(item, whole)
        if not key.startswith("@") or value.startswith("(") or "=" not in value:
            continue
        after = [it for it in items[i + 1:] if not it.startswith("@")]
        if not after:
            continue
        before, others = base + items[:i], [it for it in items[i + 1:] if it.startswith("@")]
        pattern = key[1:].strip()
        one = ",".join(before + [f"@{pattern}=({value},{','.join(after)})"] + others)
        two = ",".join(before + after + [f"@{pattern}=({value})"] + others)
        raise PolicyError(f'"{whole}" is ambiguous: does "{",".join(after)}" belong to @{pattern} or to the whole '
                          f'policy? Write "{one}" (all of it for @{pattern}) or "{two}" (only {value} for '
                          f"@{pattern})")


def _parse_relative(parent: Policy, text: str, where: str) -> Policy:
    fields: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for item in _split_top(text) if text else ():
        key, value = _split_item(item, text)
        canon = _KEY_OF.get(key.lower())
        if canon is None or key.startswith("@"):
            raise PolicyError(f'unknown key "{key}" in {where}{did_you_mean(key, _KEY_OF)}')
        if canon in seen:
            raise PolicyError(f'key "{key}" repeats "{seen[canon]}" in {where}')
        seen[canon] = key
        fields[_FIELD_OF_KEY[canon]] = _parse_value(canon, value)
    return _replace(parent, overrides=(), **fields)


def _parse_value(key: str, value: str) -> Any:
    if key in ("params", "compute", "output", "reduce"):
        return canonical_dtype(value, what=key)
    if key == "master":
        v = value.lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise PolicyError(f'master="{value}": use true or false')
    if key == "nonfinite":
        return value.lower()
    if key == "loss_scale":
        return parse_component(LossScaleConfig, value, "loss_scale")
    if key == "quant":
        return parse_component(Quantization, value, "quant")
    return parse_component(FP8Recipe, value, "fp8")


def parse_component(cls: type[LossScaleConfig] | type[Quantization] | type[FP8Recipe], value: str, what: str) -> LossScaleConfig | Quantization | FP8Recipe | None:
    """Parse ``name`` or ``name(k=v, ...)`` into a LossScaleConfig, Quantization or FP8Recipe."""
    value = value.strip()
    if cls is LossScaleConfig and value[:1] in set("0123456789+-."):
        return LossScaleConfig("static", init_scale=_parse_number(value, "loss_scale"))
    m = _CALL.fullmatch(value)
    if not m:
        raise PolicyError(f'{what}="{value}" is not NAME or NAME(key=value, ...)')
    name, args = m.group(1).lower(), m.group(3)
    if name in ("none", "off"):
        if args is not None:
            raise PolicyError(f"{what}=none takes no arguments")
        return LossScaleConfig() if cls is LossScaleConfig else None
    table: dict[str, str]
    kinds: tuple[str, ...]
    if cls is LossScaleConfig:
        table, kinds = _LOSS_ARGS, ("static", "dynamic")
    elif cls is Quantization:
        table, kinds = _QUANT_ARGS, QUANT_MODES
    else:
        table, kinds = _FP8_ARGS, ALL_FP8_SCALINGS
    if name not in kinds:
        raise PolicyError(f'{what}: unknown "{name}"{did_you_mean(name, kinds + ("none",))}; '
                          f"use one of {', '.join(kinds + ('none',))}")
    kwargs: dict[str, Any] = {}
    if args is not None and args.strip():
        positional = []
        for item in _split_top(args):
            if "=" not in item:
                positional.append(item)
                continue
            k, v = (s.strip() for s in item.split("=", 1))
            field = table.get(k.lower())
            if field is None:
                raise PolicyError(f'{what}: unknown argument "{k}"{did_you_mean(k, table)}; '
                                  f"arguments are {', '.join(sorted(set(table)))}")
            if field in kwargs:
                raise PolicyError(f'{what}: argument "{k}" is given twice')
            kwargs[field] = _parse_arg(field, v, what)
        if positional:
            if cls is LossScaleConfig and name == "static" and len(positional) == 1 and "init_scale" not in kwargs:
                kwargs["init_scale"] = _parse_number(positional[0], what)
            else:
                raise PolicyError(f"{what}: {positional[0]!r} needs a name, e.g. {name}(key=value)")
    not_for = {"static": set(_LOSS_ARGS.values()) - {"init_scale"},
               "current": {"history_len", "margin", "amax_algo"},
               "int8": {"blocksize"}, "int8-training": {"blocksize"}}.get(name, set())
    if cls is Quantization and name not in ("int8", "int8-training"):
        not_for = {"threshold"}
    misplaced = sorted(set(kwargs) & not_for)
    if misplaced:
        raise PolicyError(f"{what}: {', '.join(misplaced)} does not apply to {name}")
    if cls is LossScaleConfig:
        if name == "static" and "init_scale" not in kwargs:
            raise PolicyError(f"{what}=static needs its scale, e.g. static(1024)")
        return LossScaleConfig(name, **kwargs)
    if cls is Quantization:
        return Quantization(name, **kwargs)
    return FP8Recipe(name, **kwargs)


def _parse_arg(field: str, value: str, what: str) -> Any:
    if field == "skip":
        patterns = tuple(p.strip() for p in value.split("|"))
        return patterns
    if field in ("amax_algo", "format", "engine", "rounding", "weight_blocks"):
        return value.lower()
    if field in _BOOL_ARGS:
        v = value.strip().lower()
        if v in _TRUE or v in _FALSE:
            return v in _TRUE
        raise PolicyError(f'{what}.{field}="{value}": use true or false')
    number = _parse_number(value, f"{what}.{field}")
    if field in _INT_ARGS:
        if not float(number).is_integer():
            raise PolicyError(f"{what}.{field} must be an integer, got {value!r}")
        return int(number)
    return number


def _parse_number(text: str, what: str) -> float:
    text = text.strip()
    if len(text) > _MAX_NUMBER_LENGTH:
        raise PolicyError(f"{what}: a number of {len(text)} characters (at most {_MAX_NUMBER_LENGTH}); "
                          "write e.g. 65536, 6.5e4 or 2**16")
    if _NUMBER.fullmatch(text):
        return float(text)  # 1e400 reads as inf, which the field's range check refuses
    m = _POWER.fullmatch(text)
    if m:
        try:
            return float(int(m.group(1))) ** int(m.group(3))
        except (OverflowError, ZeroDivisionError):
            raise PolicyError(f"{what}: {text} is out of range (not a finite float)") from None
    raise PolicyError(f"{what}: malformed number {text!r}; write e.g. 65536, 6.5e4 or 2**16")


# -------------------------------------------------------------------------- formatting
def format_policy(p: Policy) -> str:
    """The canonical string: a preset name where one matches, the explicit form otherwise."""
    from .presets import preset_name_of

    name = preset_name_of(p)
    return name if name is not None else explicit_form(p)


def explicit_form(p: Policy) -> str:
    """The explicit key=value form, also for presets: params, compute and output always,
    other keys where they differ from the default, overrides last."""
    from .presets import preset_name_of

    base = _replace(p, overrides=())
    items = [f"params={p.param_dtype}", f"compute={p.compute_dtype}", f"output={p.output_dtype}"]
    items += _diff_items(Policy(p.param_dtype, p.compute_dtype, p.output_dtype), base)
    for pattern, sub in p.overrides:
        sub_name = preset_name_of(sub)
        if sub_name is None:
            sub_name = "(" + ",".join(_diff_items(base, sub)) + ")"
        items.append(f"@{pattern}={sub_name}")
    return ",".join(items)


def _diff_items(old: Policy, new: Policy) -> list[str]:
    """key=value items that turn ``old`` into ``new``, in the grammar's fixed key order."""
    items = []
    for key in ("params", "compute", "output", "reduce", "loss_scale", "quant", "fp8", "master", "nonfinite"):
        field = _FIELD_OF_KEY[key]
        if getattr(old, field) != getattr(new, field):
            items.append(f"{key}={_format_value(getattr(new, field))}")
    return items


def _format_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, LossScaleConfig):
        if v.kind == "none":
            return "none"
        if v.kind == "static":
            return f"static({_format_number(v.init_scale)})"
        return _format_call("dynamic", v, LossScaleConfig("dynamic"), (
            ("init", "init_scale"), ("growth", "growth_factor"), ("backoff", "backoff_factor"),
            ("interval", "growth_interval"), ("min", "min_scale"), ("max", "max_scale")))
    if isinstance(v, Quantization):
        return _format_call(v.mode, v, Quantization(v.mode), (
            ("blocksize", "blocksize"), ("threshold", "threshold"), ("skip", "skip")))
    if isinstance(v, FP8Recipe):
        # block-scaled recipes always name their variant (the bare names mean different things
        # in different libraries: docs/block-scaling.md)
        always = {"mxfp8": ("rounding",), "nvfp4": ("sr", "rht", "weight_blocks")}.get(v.scaling, ())
        return _format_call(v.scaling, v, FP8Recipe(v.scaling), (
            ("history", "history_len"), ("margin", "margin"), ("algo", "amax_algo"),
            ("format", "format"), ("engine", "engine"), ("rounding", "rounding"), ("sr", "sr"),
            ("rht", "rht"), ("wblocks", "weight_blocks")), always=always)
    raise TypeError(v)


def _format_call(name: str, value: Any, default: Any, args: Iterable[tuple[str, str]],
                 always: Iterable[str] = ()) -> str:
    parts = []
    for short, field in args:
        x, d = getattr(value, field), getattr(default, field)
        if x != d or field in always:
            if isinstance(x, bool):
                text = "true" if x else "false"
            elif isinstance(x, tuple):
                text = "|".join(x)
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                text = _format_number(x)
            else:
                text = str(x)
            parts.append(f"{short}={text}")
    return f"{name}({','.join(parts)})" if parts else name


def _format_number(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    if x > 0 and math.isfinite(x):
        exp = math.frexp(x)
        k = exp[1] - 1
        if exp[0] == 0.5 and abs(k) >= 8:
            return f"2**{k}"
    if x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(x)


def wrap_policy(text: str, width: int, indent: str = "", subsequent: str | None = None) -> list[str]:
    """A policy string wrapped after its top-level commas (never inside a name or a
    parenthesised argument list), so the lines join back into the one string.

    Args:
        text: The text ending in (or being) a policy string.
        width: The line width to stay within where a break exists.
        indent: The first line's prefix.
        subsequent: The other lines' prefix (default: ``indent``).

    Returns:
        The lines.
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(text[start:i + 1])
            start = i + 1
    items.append(text[start:])
    lines, line = [], indent
    nxt = indent if subsequent is None else subsequent
    for item in items:
        if line.strip() and len(line) + len(item) > width:
            lines.append(line)
            line = nxt
        line += item
    return lines + [line]
