"""Weight transfer between PyTorch and Flax layouts, both ways.

The canonical form the suite passes around is a flat ``{torch_name: numpy array}`` dict in
PyTorch layout ("fc1.weight" is [out, in], a conv weight is OIHW).  Flax stores the same
numbers as a nested dict with other leaf names and layouts:

=================  ====================  ====================
torch leaf         Flax leaf             layout change
=================  ====================  ====================
``weight`` 2-D     ``kernel``            [out, in] -> [in, out]
``weight`` 4-D     ``kernel``            OIHW -> HWIO
``weight`` 1-D     ``scale``             (LayerNorm, RMSNorm, GroupNorm)
``bias``           ``bias``              none
=================  ====================  ====================

Module paths keep their names: torch's "attn.qkv" is Flax's ("attn", "qkv") (the zoo names
Flax submodules after their torch twins).
A :class:`WeightMap` holds the rule per tensor; ``WeightMap.auto`` infers it by the table
above, and explicit entries override it (an embedding's 2-D ``weight`` is not transposed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

#: layout kind -> (torch -> flax permutation, flax -> torch permutation); None keeps the layout.
LAYOUTS = {
    "linear": ((1, 0), (1, 0)),
    "conv2d": ((2, 3, 1, 0), (3, 2, 0, 1)),
    "conv1d": ((2, 1, 0), (2, 1, 0)),
    "same": (None, None),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one torch tensor lives in the Flax params and how its axes move."""

    flax_path: tuple[str, ...]
    layout: str = "same"

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        perm = LAYOUTS[self.layout][0]
        return np.ascontiguousarray(a if perm is None else np.transpose(a, perm))

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        perm = LAYOUTS[self.layout][1]
        return np.ascontiguousarray(a if perm is None else np.transpose(a, perm))


def flax_module_names(mods: list[str]) -> tuple[str, ...]:
    """torch module path parts -> Flax's: a ModuleList / Sequential index joins its parent
    (torch "blocks.0" is Flax "blocks_0", the name linen gives list members)."""
    out: list[str] = []
    for part in mods:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def auto_rule(torch_name: str, ndim: int) -> Rule:
    *mods, leaf = torch_name.split(".")
    mods = list(flax_module_names(mods))
    if leaf == "weight":
        if ndim == 2:
            return Rule(tuple(mods) + ("kernel",), "linear")
        if ndim == 4:
            return Rule(tuple(mods) + ("kernel",), "conv2d")
        if ndim == 3:
            return Rule(tuple(mods) + ("kernel",), "conv1d")
        return Rule(tuple(mods) + ("scale",), "same")
    return Rule(tuple(mods) + (leaf,), "same")


class WeightMap:
    """torch name -> :class:`Rule`.  Build with ``WeightMap.auto(names_and_ndims, overrides)``.

    ``overrides`` maps a torch name to a Rule, a Flax path string ("embed/embedding") kept
    in layout, or a ``(path, layout)`` pair.
    """

    def __init__(self, rules: Mapping[str, Rule]):
        self.rules = dict(rules)

    @classmethod
    def auto(cls, shapes: Mapping[str, tuple], overrides: Mapping | None = None,
             kinds: Mapping[str, str] | None = None) -> WeightMap:
        """Rules by the table above.  ``kinds`` (torch module name -> class name) lets an
        ``Embedding``'s 2-D weight become Flax's untransposed ``embedding``."""
        rules = {name: auto_rule(name, len(shape)) for name, shape in shapes.items()}
        for name in rules:
            module, _, leaf = name.rpartition(".")
            if (kinds or {}).get(module) == "Embedding" and leaf == "weight":
                rules[name] = Rule(rules[name].flax_path[:-1] + ("embedding",), "same")
        for name, spec in (overrides or {}).items():
            if isinstance(spec, Rule):
                rules[name] = spec
            elif isinstance(spec, str):
                rules[name] = Rule(tuple(spec.split("/")), "same")
            else:
                path, layout = spec
                rules[name] = Rule(tuple(path.split("/")) if isinstance(path, str) else tuple(path), layout)
        return cls(rules)

    def to_flax(self, state: Mapping[str, np.ndarray]) -> dict:
        """Canonical (torch-layout) flat dict -> nested Flax params dict."""
        unknown = set(state) - set(self.rules)
        if unknown:
            raise KeyError(f"no weight-map rule for {sorted(unknown)}")
        out: dict = {}
        for name, rule in self.rules.items():
            node = out
            for key in rule.flax_path[:-1]:
                node = node.setdefault(key, {})
            node[rule.flax_path[-1]] = rule.to_flax(np.asarray(state[name]))
        return out

    def to_torch(self, params: Mapping) -> dict[str, np.ndarray]:
        """Nested Flax params dict (or its gradients) -> canonical flat dict."""
        out = {}
        for name, rule in self.rules.items():
            node = params
            for key in rule.flax_path:
                try:
                    node = node[key]
                except (KeyError, TypeError):
                    raise KeyError(f"Flax params lack {'/'.join(rule.flax_path)} (torch {name})") from None
            out[name] = rule.to_torch(np.asarray(node))
        return out

    def flax_name(self, torch_name: str) -> str:
        return "/".join(self.rules[torch_name].flax_path)

    def resolve(self, flax_params: Mapping) -> WeightMap:
        """This map checked against the Flax model's actual parameter paths.  A path Flax
        lacks gets its known alternative (a torch ``nn.Sequential`` "net.0" is linen's
        "net/layers_0"); what still has no match raises a KeyError naming every unmatched
        path on both sides and the ``weight_map`` entries that fix it."""
        have = {tuple(str(k) for k in path) for path in flatten_flax(flax_params)}
        rules = {}
        for name, rule in self.rules.items():
            path = rule.flax_path
            if path not in have:
                for alt in _alternatives(name, path):
                    if alt in have:
                        path = alt
                        break
            rules[name] = dataclasses.replace(rule, flax_path=path)
        missing = sorted(n for n, r in rules.items() if r.flax_path not in have)
        if missing:
            unused = sorted("/".join(p) for p in have - {r.flax_path for r in rules.values()})
            fix = ", ".join(f'"{n}": "{_guess(n, unused)}"' if rules[n].layout == "same" else
                            f'"{n}": ("{_guess(n, unused)}", "{rules[n].layout}")' for n in missing[:4])
            raise KeyError(f"torch parameters without a Flax counterpart: {missing}; Flax parameters no torch "
                           f"name maps to: {unused}. Pass weight_map={{{fix}}} (torch name -> Flax path, "
                           f"or (path, layout) with layout one of {sorted(LAYOUTS)})")
        return WeightMap(rules)

    def module_names(self) -> dict[str, str]:
        """Flax module path ("blocks_0.fc") -> torch module name ("blocks.0.fc"), for pairing
        the named intermediate outputs of the two sides."""
        out = {}
        for name, rule in self.rules.items():
            t_parts, f_parts = name.split(".")[:-1], list(rule.flax_path[:-1])
            for f, t in _align(t_parts, f_parts):
                out.setdefault(f, t)
        return out


def _align(t_parts: list[str], f_parts: list[str]) -> list[tuple[str, str]]:
    """(Flax prefix, torch prefix) pairs of one module path: "blocks.0" is "blocks_0",
    a Sequential's "0" is "layers_0", other parts correspond one to one."""
    pairs, i, j = [], 0, 0
    while i < len(t_parts) and j < len(f_parts):
        t, f = t_parts[i], f_parts[j]
        i += 2 if i + 1 < len(t_parts) and t_parts[i + 1].isdigit() and f == f"{t}_{t_parts[i + 1]}" else 1
        j += 1
        pairs.append((".".join(f_parts[:j]), ".".join(t_parts[:i])))
    return pairs


def _alternatives(torch_name: str, path: tuple) -> list[tuple]:
    """Other Flax spellings of one torch path: Sequential members as ``layers_<i>``."""
    *mods, _ = torch_name.split(".")
    alts, parts = [], []
    for part in mods:
        parts.append(f"layers_{part}" if part.isdigit() else part)
    alts.append(tuple(parts) + path[-1:])
    return alts


def _guess(torch_name: str, flax_paths: list[str]) -> str:
    import difflib

    leaf = "kernel" if torch_name.endswith("weight") else torch_name.rsplit(".", 1)[-1]
    pool = [p for p in flax_paths if p.endswith(leaf)] or flax_paths
    near = difflib.get_close_matches(torch_name.replace(".", "/"), pool, n=1, cutoff=0.0)
    return near[0] if near else "<flax/path>"


def flatten_flax(params: Mapping, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(flatten_flax(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out
