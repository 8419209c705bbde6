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


def auto_rule(torch_name: str, ndim: int) -> Rule:
    *mods, leaf = torch_name.split(".")
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
    def auto(cls, shapes: Mapping[str, tuple], overrides: Mapping | None = None) -> WeightMap:
        rules = {name: auto_rule(name, len(shape)) for name, shape in shapes.items()}
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


def flatten_flax(params: Mapping, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(flatten_flax(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out
