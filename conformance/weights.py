"""Weight transfer between PyTorch and Flax layouts, both ways (public API).

For users::

    from conformance.weights import WeightMap, torch_to_flax, flax_to_torch

    params = torch_to_flax(torch_model)                   # nested Flax params (NumPy)
    params = torch_to_flax(torch_model, {"head.weight": "out/kernel"}, flax_params=variables["params"])
    state = flax_to_torch(params, WeightMap.from_torch(torch_model))   # flat torch state (NumPy)

``WeightMap.from_torch(module, overrides)`` reads everything it needs from the module:
parameter names and shapes, each submodule's class (the rule table :data:`KIND_RULES`),
tied parameters (one tensor under two names, e.g. an LM head tied to the token embedding:
the alias is dropped torch -> Flax and restored Flax -> torch) and buffers (a causal mask:
no Flax counterpart, left out).  ``overrides`` maps a torch name to a Flax path
("tok/embedding"), a ``(path, layout)`` pair, a :class:`Rule`, or ``None`` (no counterpart:
a buffer or a tied alias; a trained parameter cannot be None).  A key may be a glob
pattern ("blocks.*.attn.mask": None); an explicit name wins over a pattern.

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

By module class (:data:`KIND_RULES`, extendable with ``kind_rules={"MyLinear": {...}}``)
the rule wins over the table above: an ``Embedding``'s 2-D ``weight`` is Flax's untransposed
``embedding``, a ``LayerNorm``'s ``weight`` its ``scale`` whatever its shape.

Module paths keep their names: torch's "attn.qkv" is Flax's ("attn", "qkv"); a ModuleList
member "blocks.0" is linen's "blocks_0"; a Sequential member "net.0" is "net_0" or
"net/layers_0" (checked against the Flax params by :meth:`WeightMap.resolve`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

#: layout kind -> (torch -> flax permutation, flax -> torch permutation); None keeps the layout.
LAYOUTS = {
    "linear": ((1, 0), (1, 0)),
    "conv2d": ((2, 3, 1, 0), (3, 2, 0, 1)),
    "conv1d": ((2, 1, 0), (2, 1, 0)),
    "same": (None, None),
}


#: attention head layouts (need ``Rule.heads``): "heads_in" a q/k/v projection, torch
#: [heads * head_dim, d] (a bias [heads * head_dim]) <-> Flax DenseGeneral [d, heads, head_dim]
#: ([heads, head_dim]); "heads_out" the output projection, torch [d, heads * head_dim] <->
#: Flax [heads, head_dim, d]
HEAD_LAYOUTS = ("heads_in", "heads_out")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one torch tensor lives in the Flax params and how its axes move.

    ``parts``: a packed torch tensor (a fused qkv projection [3 d, d]) split in equal chunks
    along its first axis into these Flax paths (``flax_path`` is the first), each chunk by
    ``layout``; ``heads``: the head count of the head layouts (:data:`HEAD_LAYOUTS`)."""

    flax_path: tuple[str, ...]
    layout: str = "same"
    heads: int = 0
    parts: tuple[tuple[str, ...], ...] = ()

    @property
    def paths(self) -> tuple[tuple[str, ...], ...]:
        return self.parts or (self.flax_path,)

    def _heads(self, n: int, what: str) -> int:
        if self.heads < 1 or n % self.heads:
            raise WeightMapError(f"layout {self.layout!r} of {'/'.join(self.flax_path)}: {what} {n} is not split "
                                 f"into heads={self.heads} heads; give the Rule heads=<the head count>")
        return n // self.heads

    def _one_to_flax(self, a: np.ndarray) -> np.ndarray:
        if self.layout == "heads_in":
            dh = self._heads(a.shape[0], "the projection width")
            return np.ascontiguousarray(a.reshape(self.heads, dh) if a.ndim == 1 else
                                        a.T.reshape(a.shape[1], self.heads, dh))
        if self.layout == "heads_out":
            dh = self._heads(a.shape[1], "the input width")
            return np.ascontiguousarray(a.T.reshape(self.heads, dh, a.shape[0]))
        perm = LAYOUTS[self.layout][0]
        return np.ascontiguousarray(a if perm is None else np.transpose(a, perm))

    def _one_to_torch(self, a: np.ndarray) -> np.ndarray:
        if self.layout == "heads_in":
            return np.ascontiguousarray(a.reshape(-1) if a.ndim == 2 else a.reshape(a.shape[0], -1).T)
        if self.layout == "heads_out":
            return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
        perm = LAYOUTS[self.layout][1]
        return np.ascontiguousarray(a if perm is None else np.transpose(a, perm))

    def to_flax(self, a: np.ndarray):
        """The Flax array (a list of them, one per path, for a split rule)."""
        if not self.parts:
            return self._one_to_flax(a)
        if a.shape[0] % len(self.parts):
            raise WeightMapError(f"a packed tensor of {a.shape[0]} rows does not split into {len(self.parts)} parts")
        return [self._one_to_flax(c) for c in np.split(a, len(self.parts), axis=0)]

    def to_torch(self, a) -> np.ndarray:
        """The torch tensor from the Flax array (the list of them, in ``parts`` order)."""
        if not self.parts:
            return self._one_to_torch(np.asarray(a))
        return np.ascontiguousarray(np.concatenate([self._one_to_torch(np.asarray(x)) for x in a], axis=0))


#: torch module class -> {torch leaf: (Flax leaf, layout)}: the rule of each parameter of
#: that kind of module.  Kinds not listed fall back to the leaf-and-ndim table above.
#: ``WeightMap.auto(..., kind_rules=...)`` / ``from_torch(..., kind_rules=...)`` add or
#: replace entries for a call (your own layer classes).
KIND_RULES: dict[str, dict[str, tuple[str, str]]] = {
    "Linear": {"weight": ("kernel", "linear"), "bias": ("bias", "same")},
    "Embedding": {"weight": ("embedding", "same")},
    "Conv1d": {"weight": ("kernel", "conv1d"), "bias": ("bias", "same")},
    "Conv2d": {"weight": ("kernel", "conv2d"), "bias": ("bias", "same")},
    "LayerNorm": {"weight": ("scale", "same"), "bias": ("bias", "same")},
    "RMSNorm": {"weight": ("scale", "same")},
    "GroupNorm": {"weight": ("scale", "same"), "bias": ("bias", "same")},
    "BatchNorm1d": {"weight": ("scale", "same"), "bias": ("bias", "same")},
    "BatchNorm2d": {"weight": ("scale", "same"), "bias": ("bias", "same")},
}


class WeightMapError(KeyError):
    """A name with no rule, or a Flax path the params lack; the message names the entry to add."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


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


def auto_rule(torch_name: str, ndim: int, kind: str | None = None,
              kind_rules: Mapping[str, Mapping[str, tuple[str, str]]] | None = None) -> Rule:
    """The rule of one torch tensor: by its module's class (``kind``) when the table of
    kinds (:data:`KIND_RULES` updated by ``kind_rules``) has it, else by leaf name and ndim."""
    *mods, leaf = torch_name.split(".")
    mods = list(flax_module_names(mods))
    table = {**KIND_RULES, **(kind_rules or {})}
    if kind in table and leaf in table[kind]:
        flax_leaf, layout = table[kind][leaf]
        if layout not in LAYOUTS:
            raise ValueError(f"kind_rules[{kind!r}][{leaf!r}]: layout {layout!r} is not one of {sorted(LAYOUTS)}")
        return Rule(tuple(mods) + (flax_leaf,), layout)
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
    """torch name -> :class:`Rule`, plus the torch names that have no Flax tensor of their own.

    ``rules``: the tensors both frameworks hold; ``ties``: alias -> the torch name it shares
    storage with (an LM head tied to the embedding); ``ignored``: names with no counterpart
    (buffers such as a causal mask, entries mapped to ``None``).  Build one with
    :meth:`from_torch` (from a module) or :meth:`auto` (from names and shapes).
    """

    def __init__(self, rules: Mapping[str, Rule], ties: Mapping[str, str] | None = None,
                 ignored=()):
        self.rules = dict(rules)
        self.ties = dict(ties or {})
        self.ignored = frozenset(ignored)

    @classmethod
    def auto(cls, shapes: Mapping[str, tuple], overrides: Mapping | None = None,
             kinds: Mapping[str, str] | None = None, *, ties: Mapping[str, str] | None = None,
             buffers=(), kind_rules: Mapping | None = None) -> WeightMap:
        """Rules by the tables above for every name in ``shapes``.  ``kinds`` (torch module
        name -> class name) selects the rule of :data:`KIND_RULES`; ``ties`` (alias ->
        canonical name) and ``buffers`` (names) have no Flax tensor of their own.
        ``overrides`` maps a torch name to a Rule, a Flax path string ("embed/embedding")
        kept in layout, a ``(path, layout)`` pair, or None (no counterpart)."""
        kinds, ties, buffers = dict(kinds or {}), dict(ties or {}), set(buffers)
        rules, ignored = {}, set(buffers)
        for name, shape in shapes.items():
            if name in ties or name in buffers:
                continue
            rules[name] = auto_rule(name, len(shape), kinds.get(name.rpartition(".")[0]), kind_rules)
        for name, spec in _expand(overrides or {}, shapes).items():
            if name not in shapes:
                raise WeightMapError(f"weight_map entry {name!r} names no torch tensor; the torch names "
                                     f"are {_listing(shapes)}")
            if spec is None:
                if name in rules:
                    raise WeightMapError(f"weight_map[{name!r}] = None, but {name} is a trained parameter: "
                                         "both frameworks must hold it; map it to its Flax path instead")
                ignored.add(name)
                continue
            rule = _as_rule(name, spec)
            if name in ties:
                canon = rules.get(ties[name])
                if canon is not None and rule.flax_path != canon.flax_path:
                    raise WeightMapError(
                        f"{name} shares storage with {ties[name]} (tied): the Flax model must use one "
                        f"parameter for both, {'/'.join(canon.flax_path)}; drop the weight_map entry "
                        f"for {name} or map it to \"{'/'.join(canon.flax_path)}\"")
                continue  # an alias stays an alias
            if name in buffers:
                raise WeightMapError(f"{name} is a buffer (the model's own state, not a trained parameter): "
                                     "buffers are not transferred or compared; map it to None or leave it out")
            rules[name] = rule
        return cls(rules, ties, ignored)

    @classmethod
    def from_torch(cls, module: Any, overrides: Mapping | None = None,
                   kind_rules: Mapping | None = None) -> WeightMap:
        """The map of a torch ``nn.Module``: its parameters by the rule tables, tied
        parameters (the same tensor under two names) as aliases, buffers left out."""
        shapes = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
        kinds = {n: type(m).__name__ for n, m in module.named_modules() if n}
        canonical = {id(p): n for n, p in module.named_parameters()}  # the first name of each tensor
        ties = {n: canonical[id(p)] for n, p in module.named_parameters(remove_duplicate=False)
                if canonical[id(p)] != n}
        params = set(canonical.values()) | set(ties)
        buffers = [n for n in shapes if n not in params]
        # torch's MultiheadAttention <-> Flax's MultiHeadDotProductAttention (query/key/value/out)
        mha = {}
        for n, m in module.named_modules():
            if type(m).__name__ == "MultiheadAttention" and getattr(m, "in_proj_weight", None) is not None:
                mha.update(attention_rules(m.num_heads, "/".join(flax_module_names(n.split("."))) if n else "",
                                           f"{n}.in_proj_weight" if n else "in_proj_weight",
                                           f"{n}.out_proj.weight" if n else "out_proj.weight",
                                           bias=m.in_proj_bias is not None))
        overrides = {**{k: r for k, r in mha.items() if k in shapes}, **dict(overrides or {})}
        return cls.auto(shapes, overrides, kinds, ties=ties, buffers=buffers, kind_rules=kind_rules)

    def _check_names(self, names) -> None:
        unknown = sorted(set(names) - set(self.rules) - set(self.ties) - self.ignored)
        if unknown:
            raise WeightMapError(f"no weight-map rule for {unknown}: add weight_map={{"
                                 + ", ".join(f'"{n}": "<flax/path>"' for n in unknown[:3])
                                 + "} (or None: no counterpart)")

    def to_flax(self, state: Mapping[str, np.ndarray]) -> dict:
        """Canonical (torch-layout) flat dict -> nested Flax params dict.  Tied aliases and
        ignored names (buffers) may be present and are left out; an alias whose values differ
        from its canonical tensor is an error (the tie would be lost)."""
        self._check_names(state)
        for alias, canon in self.ties.items():
            if alias in state and canon in state and not np.array_equal(np.asarray(state[alias]),
                                                                        np.asarray(state[canon])):
                raise WeightMapError(f"{alias} is tied to {canon} but holds other values")
        out: dict = {}
        for name, rule in self.rules.items():
            arrays = rule.to_flax(np.asarray(state[name]))
            for path, a in zip(rule.paths, arrays if rule.parts else [arrays]):
                node = out
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = a
        return out

    def to_torch(self, params: Mapping, aliases: bool = False) -> dict[str, np.ndarray]:
        """Nested Flax params dict (or its gradients) -> canonical flat dict; with
        ``aliases`` also each tied alias (the same values under its own name)."""
        out = {}
        for name, rule in self.rules.items():
            found = []
            for path in rule.paths:
                node = params
                for key in path:
                    try:
                        node = node[key]
                    except (KeyError, TypeError):
                        raise WeightMapError(f"Flax params lack {'/'.join(path)} (torch {name})") from None
                found.append(np.asarray(node))
            out[name] = rule.to_torch(found if rule.parts else found[0])
        if aliases:
            out.update({alias: out[canon] for alias, canon in self.ties.items() if canon in out})
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
            if rule.parts:  # a split rule names its paths itself
                rules[name] = rule
                continue
            if path not in have:
                for alt in _alternatives(name, path):
                    if alt in have:
                        path = alt
                        break
            rules[name] = dataclasses.replace(rule, flax_path=path)
        missing = sorted(n for n, r in rules.items() if not set(r.paths) <= have)
        if missing:
            unused = sorted("/".join(p) for p in have - {p for r in rules.values() for p in r.paths})
            fix = ", ".join(f'"{n}": "{_guess(n, unused, rules[n].flax_path[-1])}"' if rules[n].layout == "same" else
                            f'"{n}": ("{_guess(n, unused, rules[n].flax_path[-1])}", "{rules[n].layout}")' for n in missing[:4])
            raise WeightMapError(f"torch parameters without a Flax counterpart: {missing}; Flax parameters no "
                                 f"torch name maps to: {unused}. Pass weight_map={{{fix}}} (torch name -> Flax "
                                 f"path, or (path, layout) with layout one of {sorted(LAYOUTS)}, or None for a "
                                 "buffer or tied alias with no counterpart)")
        return WeightMap(rules, self.ties, self.ignored)

    def module_names(self) -> dict[str, str]:
        """Flax module path ("blocks_0.fc") -> torch module name ("blocks.0.fc"), for pairing
        the named intermediate outputs of the two sides."""
        out = {}
        for name, rule in self.rules.items():
            t_parts, f_parts = name.split(".")[:-1], list(rule.flax_path[:-1])
            for f, t in _align(t_parts, f_parts):
                out.setdefault(f, t)
        return out


def attention_rules(heads: int, flax_module: str, qkv_weight: str, out_weight: str | None = None, *,
                    bias: bool = True, names=("query", "key", "value", "out")) -> dict[str, Rule]:
    """Weight-map entries for a torch attention with a packed q/k/v projection and a Flax one
    with separate per-head projections (``nn.MultiHeadDotProductAttention``, ``DenseGeneral``
    with features (heads, head_dim)).

    ``qkv_weight``: the torch name of the packed [3 d, d] weight (``attn.in_proj_weight`` of
    ``nn.MultiheadAttention``, ``attn.qkv.weight`` of a fused Linear); its bias (the same
    name with ``bias`` for ``weight``) is split too when ``bias``.  ``out_weight``: the output
    projection's [d, d] weight, to ``<flax_module>/out/kernel`` [heads, head_dim, d] (its
    bias keeps its layout).  ``names``: the Flax submodule names of q, k, v and the output."""
    q, k, v, o = names
    base = tuple(flax_module.split("/")) if flax_module else ()
    out = {qkv_weight: Rule(base + (q, "kernel"), "heads_in", heads,
                            parts=tuple(base + (p, "kernel") for p in (q, k, v)))}
    if bias:
        out[qkv_weight[:-len("weight")] + "bias" if qkv_weight.endswith("weight") else qkv_weight + "_bias"] = Rule(base + (q, "bias"), "heads_in", heads,
                                                         parts=tuple(base + (p, "bias") for p in (q, k, v)))
    if out_weight is not None:
        out[out_weight] = Rule(base + (o, "kernel"), "heads_out", heads)
        out[out_weight.rpartition(".")[0] + ".bias"] = Rule(base + (o, "bias"), "same")
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
    """Other Flax spellings of one torch path: Sequential members as linen's ``layers_<i>``;
    nnx's, where a list member is its own path entry ("blocks", "0") and an
    ``nnx.Sequential`` member sits under "layers" ("net", "layers", "0")."""
    *mods, _ = torch_name.split(".")
    linen = tuple(f"layers_{part}" if part.isdigit() else part for part in mods)
    nnx_list = tuple(mods)
    nnx_seq = tuple(q for part in mods for q in (("layers", part) if part.isdigit() else (part,)))
    return [alt + path[-1:] for alt in (linen, nnx_list, nnx_seq)]


def _guess(torch_name: str, flax_paths: list[str], leaf: str | None = None) -> str:
    import difflib

    leaf = leaf or ("kernel" if torch_name.endswith("weight") else torch_name.rsplit(".", 1)[-1])
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


def _expand(overrides: Mapping, shapes: Mapping) -> dict:
    """Overrides with glob keys ("blocks.*.attn.mask": None) expanded to the names they
    match; an explicit name wins over a pattern.  A pattern that matches nothing is an error."""
    import fnmatch

    out = {}
    for key, spec in overrides.items():
        if any(c in key for c in "*?["):
            hits = [n for n in shapes if fnmatch.fnmatchcase(n, key)]
            if not hits:
                raise WeightMapError(f"weight_map pattern {key!r} matches no torch tensor; the torch names "
                                     f"are {_listing(shapes)}")
            for n in hits:
                out.setdefault(n, spec)
    out.update({k: v for k, v in overrides.items() if not any(c in k for c in "*?[")})
    return out


def _as_rule(name: str, spec) -> Rule:
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        return Rule(tuple(spec.split("/")), "same")
    try:
        path, layout = spec
    except (TypeError, ValueError):
        raise WeightMapError(f"weight_map[{name!r}] = {spec!r}: expected a Flax path (\"mod/kernel\"), a "
                             f"(path, layout) pair with layout one of {sorted(LAYOUTS)}, a Rule, or None") from None
    if layout not in LAYOUTS:
        raise WeightMapError(f"weight_map[{name!r}]: layout {layout!r} is not one of {sorted(LAYOUTS)}")
    return Rule(tuple(path.split("/")) if isinstance(path, str) else tuple(path), layout)


def _listing(names, n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _is_nnx(obj) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency of the JAX side
        return False
    return isinstance(obj, (nnx.Module, nnx.State))


def flax_tree(params) -> Mapping:
    """A nested params dict from a linen params dict, an nnx ``Module`` (its ``nnx.Param``
    variables) or an ``nnx.State``, as plain nested dicts of arrays (nnx list members keep
    their integer keys)."""
    if not _is_nnx(params):
        return params
    from flax import nnx

    state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
    return nnx.to_pure_dict(state)


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _keyed_like(tree, ref):
    """``tree`` (string keys) with the key types of ``ref`` (nnx's integer list indices)."""
    if not isinstance(tree, Mapping) or not isinstance(ref, Mapping):
        return tree
    by_str = {str(k): k for k in ref}
    return {by_str.get(k, k): _keyed_like(v, ref.get(by_str.get(k, k), {})) for k, v in tree.items()}


def _state_of(module_or_state) -> dict[str, np.ndarray]:
    if hasattr(module_or_state, "state_dict"):
        import torch

        return {k: v.detach().to(torch.float32).cpu().numpy().copy() if v.is_floating_point()
                else v.detach().cpu().numpy().copy() for k, v in module_or_state.state_dict().items()}
    return {k: np.asarray(v) for k, v in module_or_state.items()}


def torch_to_flax(module_or_state, weight_map: WeightMap | Mapping | None = None, *,
                  flax_params: Mapping | None = None, kind_rules: Mapping | None = None) -> dict:
    """A torch model's weights as a nested Flax params dict of NumPy arrays (float tensors as
    float32, the values bit for bit).

    ``module_or_state``: an ``nn.Module`` (ties and buffers read from it) or a flat
    ``{name: array}`` state (then pass a :class:`WeightMap`).  ``weight_map``: a WeightMap,
    or overrides for :meth:`WeightMap.from_torch`.  ``flax_params`` (the Flax model's own
    params: ``model.init(...)["params"]``, an nnx ``Module`` or an ``nnx.State``): the paths
    are checked against it (linen's Sequential and nnx's list spellings resolved), the result
    keyed as it is (nnx: integer list indices, so ``nnx.replace_by_pure_dict(nnx.state(model,
    nnx.Param), params)`` takes it), and an unmatched path is a :class:`WeightMapError`
    naming the entry to add."""
    wm = _map_of(module_or_state, weight_map, kind_rules)
    if flax_params is None:
        return wm.to_flax(_state_of(module_or_state))
    ref = flax_tree(flax_params)
    wm = wm.resolve(_str_keys(ref))
    return _keyed_like(wm.to_flax(_state_of(module_or_state)), ref)


def flax_to_torch(params, weight_map: WeightMap) -> dict[str, np.ndarray]:
    """Nested Flax params (a linen params dict, an nnx ``Module`` or ``nnx.State``) -> flat
    torch state (NumPy, torch layout), tied aliases included; buffers (no Flax counterpart)
    are not in it: load with ``strict=False`` or merge into the module's own
    ``state_dict()``.  The map's paths are resolved against the params (nnx's spellings)."""
    tree = _str_keys(flax_tree(params))
    return weight_map.resolve(tree).to_torch(tree, aliases=True)


def _map_of(module_or_state, weight_map, kind_rules) -> WeightMap:
    if isinstance(weight_map, WeightMap):
        return weight_map
    if hasattr(module_or_state, "state_dict"):
        return WeightMap.from_torch(module_or_state, weight_map, kind_rules)
    return WeightMap.auto({k: np.shape(v) for k, v in module_or_state.items()}, weight_map,
                          kind_rules=kind_rules)


# ------------------------------------------------------------------ optimizer state
def checkpoint_names(weight_map: WeightMap, params) -> dict[str, str]:
    """Flax module path -> torch module path for ``dualprec_jax.checkpoint`` (``names=``), from
    the map's rules, so the optimizer state is named and laid out as the cross-framework
    training checkpoint names it; checked against the map: every Flax leaf of ``params``
    must get the torch name and layout the map gives it."""
    from dualprec_jax.checkpoint import torch_names

    tree = flax_tree(params)
    wm = weight_map.resolve(_str_keys(tree))
    names = {"/".join(r.flax_path[:-1]): t.rpartition(".")[0] for t, r in wm.rules.items()}
    want = {r.flax_path: (t, r.layout) for t, r in wm.rules.items()}
    for path, got in torch_names(tree, names).items():
        if want.get(tuple(path)) != got:
            raise WeightMapError(
                f"optimizer state: the Flax leaf {'/'.join(path)} is {got[0]} ({got[1]}) by the training-checkpoint "
                f"rules but {want.get(tuple(path), ('no torch name', ''))[0]} by the weight map; the optimizer-state "
                "mapping takes maps whose entries follow those rules (kernel -> weight, scale/embedding -> weight, "
                "other leaves by name)")
    return names


def optimizer_state_to_flax(state: Mapping, params, opt_state, weight_map: WeightMap):
    """torch's optimizer state in the training checkpoint's backend-neutral form
    (``dualprec_torch.checkpoint.optimizer_state(model, optimizer)``: Adam/AdamW ``exp_avg``,
    ``exp_avg_sq`` and the step; SGD's ``momentum_buffer``, by torch name and layout) put
    into ``opt_state`` (optax's adam/adamw/sgd state of ``params``, e.g. ``tx.init(params)``,
    loss-scaled or not) through ``weight_map``.  Tied aliases are dropped (torch's optimizer
    holds a tied tensor once, under its first name)."""
    from dualprec_jax.checkpoint import load_optimizer_state

    names = checkpoint_names(weight_map, params)
    slots = {s: {n: v for n, v in d.items() if n not in weight_map.ties} for s, d in state["slots"].items()}
    return load_optimizer_state(flax_tree(params), opt_state, dict(state, slots=slots), names)


def optimizer_state_to_torch(params, opt_state, weight_map: WeightMap) -> dict:
    """The optax state of ``params`` in the training checkpoint's backend-neutral form, by
    torch name and layout (load it with ``dualprec_torch.checkpoint.load_optimizer_state``)."""
    from dualprec_jax.checkpoint import optimizer_state

    return optimizer_state(flax_tree(params), opt_state, checkpoint_names(weight_map, params))
