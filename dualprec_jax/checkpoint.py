"""One training checkpoint that resumes in either framework (the twin of
`dualprec_torch.checkpoint`; see docs/checkpoints.md)::

    from dualprec_jax.checkpoint import save_training, load_training
    save_training("run/step5.safetensors", params, opt_state, prec, names={"Dense_0": "fc1"})
    params, opt_state = load_training("run/step5.safetensors", params, opt_state, prec,
                                      names={"Dense_0": "fc1"})

The file holds torch names and layouts.  A Flax leaf maps to a torch name by its module path
(joined with ".", renamed by ``names``: Flax module path -> torch module path, e.g.
``{"Dense_0": "0", "blocks_0/attn": "blocks.0.attn"}``) and its leaf: ``kernel`` -> ``weight``
(2-D transposed [in, out] -> [out, in]; 3-D WIO -> OIW; 4-D HWIO -> OIHW), ``scale`` and
``embedding`` -> ``weight``, anything else keeps its name.  optax's ``adam``/``adamw``
(``ScaleByAdamState``: count, mu, nu) carry torch's Adam/AdamW state (step, exp_avg,
exp_avg_sq); ``sgd`` with momentum (``TraceState``) torch SGD's ``momentum_buffer``.  Other
optax states are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualprec import checkpoint
from dualprec.errors import CheckpointError

from .optim import LossScaledOptState

__all__ = ["save_training", "load_training", "torch_names", "optimizer_state", "load_optimizer_state"]

#: layout -> (flax -> torch permutation, torch -> flax permutation)
_PERMS = {"linear": ((1, 0), (1, 0)), "conv1d": ((2, 1, 0), (2, 1, 0)), "conv2d": ((3, 2, 0, 1), (2, 3, 1, 0)),
          "same": (None, None)}


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _leaves_with_paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(_key(k) for k in path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _torch_name(path: tuple[str, ...], ndim: int, names: Mapping[str, str]) -> tuple[str, str]:
    *mods, leaf = path
    module = "/".join(mods)
    for flax_mod in sorted(names, key=len, reverse=True):
        if module == flax_mod or module.startswith(flax_mod + "/"):
            rest = module[len(flax_mod):].lstrip("/")
            module = names[flax_mod] + ("/" + rest if rest else "")
            break
    module = module.replace("/", ".")
    if leaf == "kernel":
        layout = {2: "linear", 3: "conv1d", 4: "conv2d"}.get(ndim, "same")
        leaf = "weight"
    elif leaf in ("scale", "embedding"):
        layout, leaf = "same", "weight"
    else:
        layout = "same"
    return (f"{module}.{leaf}" if module else leaf), layout


def torch_names(params, names: Mapping[str, str] | None = None) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax leaf path -> (torch parameter name, layout) for every leaf of ``params``."""
    out, seen = {}, {}
    for path, x in _leaves_with_paths(params):
        name, layout = _torch_name(path, np.ndim(x), dict(names or {}))
        if name in seen:
            raise CheckpointError(f"Flax params {'/'.join(seen[name])} and {'/'.join(path)} both map to the torch "
                                  f"name {name!r}; rename one with names=")
        seen[name] = path
        out[path] = (name, layout)
    return out


def _to_torch(x, layout: str) -> np.ndarray:
    perm = _PERMS[layout][0]
    a = np.asarray(x)
    return np.ascontiguousarray(a if perm is None else np.transpose(a, perm))


def _to_flax(a, layout: str, like) -> jax.Array:
    perm = _PERMS[layout][1]
    a = np.asarray(a)
    a = a if perm is None else np.transpose(a, perm)
    if tuple(a.shape) != tuple(np.shape(like)):
        raise CheckpointError(f"load_training: shape {tuple(a.shape)} (Flax layout) in the checkpoint, "
                              f"{tuple(np.shape(like))} here")
    return jnp.asarray(a, dtype=like.dtype)


# --------------------------------------------------------------------------- optax states
def _states(tree) -> list:
    """The optax state NamedTuples in an (inner) optimizer state, depth first."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        out = [tree]
        for v in tree:
            if isinstance(v, (tuple, list)):
                out += _states(v)
        return out
    if isinstance(tree, (tuple, list)):
        return [s for v in tree for s in _states(v)]
    return []


#: states whose arrays are a step count (set to the checkpoint's step) and configuration
_COUNT_ONLY = ("ScaleByScheduleState", "InjectHyperparamsState", "InjectStatefulHyperparamsState")


def _classify(inner) -> tuple[str, Any]:
    found = []
    for s in _states(inner):
        if isinstance(s, optax.ScaleByAdamState):
            found.append(("adam", s))
        elif isinstance(s, optax.TraceState):
            found.append(("sgd", s))
        elif type(s).__name__ in _COUNT_ONLY or not s._fields or all(
                isinstance(v, (tuple, list)) and _states(v) for v in s):
            continue  # EmptyState, a schedule's count, a wrapper (MaskedState ...) whose states are walked
        else:
            raise CheckpointError(f"a training checkpoint maps optax adam/adamw (ScaleByAdamState) and sgd "
                                  f"(TraceState) to torch.optim; {type(s).__name__} has no mapping")
    if len(found) > 1:
        raise CheckpointError(f"the optimizer state holds {len(found)} adam/trace states; a training checkpoint "
                              "maps one")
    return found[0] if found else ("none", None)


def optimizer_state(params, opt_state, names=None) -> dict:
    """The backend-neutral optimizer state of a loss-scaled (or plain) optax state."""
    inner = opt_state.inner if isinstance(opt_state, LossScaledOptState) else opt_state
    kind, s = _classify(inner)
    if kind == "none":
        return {"kind": "none", "step": 0, "slots": {}}
    rules = torch_names(params, names)
    slots = {}
    trees = {"exp_avg": s.mu, "exp_avg_sq": s.nu} if kind == "adam" else {"momentum_buffer": s.trace}
    for slot, tree in trees.items():
        slots[slot] = {rules[p][0]: _to_torch(x, rules[p][1]) for p, x in _leaves_with_paths(tree)}
    step = int(s.count) if kind == "adam" else 0
    return {"kind": kind, "step": step, "slots": slots}


def load_optimizer_state(params, opt_state, state: Mapping, names=None):
    """``opt_state`` with the backend-neutral optimizer ``state`` put in (by torch name)."""
    wrapped = isinstance(opt_state, LossScaledOptState)
    inner = opt_state.inner if wrapped else opt_state
    kind, _ = _classify(inner)
    if state["kind"] != kind and not {state["kind"], kind} <= {"sgd", "none"}:
        raise CheckpointError(f"load_training: the checkpoint holds {state['kind']} optimizer state, this optax "
                              f"optimizer keeps {kind} state")
    rules = torch_names(params, names)
    step = int(state["step"])

    def tree_from(slot, like):
        saved = state["slots"].get(slot, {})
        leaves = []
        for path, x in _leaves_with_paths(like):
            name, layout = rules[path]
            leaves.append(_to_flax(saved[name], layout, x) if name in saved else jnp.zeros_like(x))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)

    def rebuild(tree):
        if isinstance(tree, optax.ScaleByAdamState):
            return tree._replace(count=jnp.asarray(step, tree.count.dtype), mu=tree_from("exp_avg", tree.mu),
                                 nu=tree_from("exp_avg_sq", tree.nu))
        if isinstance(tree, optax.TraceState):
            return tree._replace(trace=tree_from("momentum_buffer", tree.trace))
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):
            tree = type(tree)(*[rebuild(v) if isinstance(v, (tuple, list)) else v for v in tree])
            if type(tree).__name__ in _COUNT_ONLY and kind == "adam":
                tree = tree._replace(count=jnp.asarray(step, tree.count.dtype))
            return tree
        if isinstance(tree, (tuple, list)):
            return type(tree)(rebuild(v) for v in tree)
        return tree

    new = rebuild(inner)
    return opt_state._replace(inner=new) if wrapped else new


# ------------------------------------------------------------------------ masters by name
def _masters_to_torch(state: dict, params, names) -> dict:
    rules = {".".join(p): r for p, r in torch_names(params, names).items()}
    out = {}
    for dotted, x in state.get("master_weights", {}).items():
        if dotted not in rules:
            raise CheckpointError(f"save_training: master weight {dotted} has no parameter of that path")
        name, layout = rules[dotted]
        out[name] = _to_torch(x, layout)
    return dict(state, master_weights=out)


def _masters_from_torch(state: dict, params, names) -> dict:
    by_name = {r[0]: (".".join(p), r[1], x) for (p, r), (_, x) in
               zip(torch_names(params, names).items(), _leaves_with_paths(params))}
    out = {}
    for name, a in state.get("master_weights", {}).items():
        if name not in by_name:
            raise CheckpointError(f"load_training: master weight {name} has no parameter of that name here")
        dotted, layout, like = by_name[name]
        out[dotted] = np.asarray(_to_flax(a, layout, jax.ShapeDtypeStruct(np.shape(like), jnp.float32)))
    return dict(state, master_weights=out)


def _rename_modules(state: dict, names: Mapping[str, str] | None, to_torch: bool) -> dict:
    """FP8 state names ``fp8.<layer>.<role>.<state>`` with the layer path renamed by ``names``
    (Flax module path -> torch module path; reversed when loading)."""
    if not names or "fp8" not in state.get("extensions", {}):
        return state
    table = {k.replace("/", "."): v for k, v in names.items()}
    if not to_torch:
        table = {v: k for k, v in table.items()}

    def rename(layer: str) -> str:
        for src in sorted(table, key=len, reverse=True):
            if layer == src or layer.startswith(src + "."):
                return table[src] + layer[len(src):]
        return layer

    out = {}
    for name, value in state["extensions"]["fp8"].items():
        prefix, rest = name.split(".", 1)
        layer, role, kind = rest.rsplit(".", 2)
        out[f"{prefix}.{rename(layer)}.{role}.{kind}"] = value
    return dict(state, extensions=dict(state["extensions"], fp8=out))


# ------------------------------------------------------------------------------ the API
def save_training(path, params, opt_state: LossScaledOptState, precision, *, variables=None,
                  names: Mapping[str, str] | None = None) -> None:
    """Write ``params`` (under torch names and layouts), the optimizer state and the precision
    state to one checksummed safetensors file that `load_training` here or in
    `dualprec_torch.checkpoint` resumes.  ``variables``: the model variables, for precision
    extensions (FP8 state); ``names``: Flax module path -> torch module path."""
    rules = torch_names(params, names)
    flat = {rules[p][0]: _to_torch(x, rules[p][1]) for p, x in _leaves_with_paths(params)}
    prec_state = _masters_to_torch(precision.state_dict(opt_state, variables), params, names)
    prec_state = _rename_modules(prec_state, names, to_torch=True)
    checkpoint.save_training_file(path, flat, optimizer_state(params, opt_state, names), prec_state)


def load_training(path, params, opt_state: LossScaledOptState, precision, *, variables=None,
                  names: Mapping[str, str] | None = None, strict: bool = True):
    """``(params, opt_state)`` (with ``variables``: ``(params, opt_state, variables)``, the
    variables holding the new params and the FP8 state) resumed from
    `save_training`'s file, written by either backend.  ``params`` and ``opt_state`` give the
    structure (``tx.init(params)`` of the wrapped optimizer)."""
    data = checkpoint.load_training_file(path)
    rules = torch_names(params, names)
    here = {r[0] for r in rules.values()}
    missing, unexpected = sorted(here - set(data["params"])), sorted(set(data["params"]) - here)
    if strict and (missing or unexpected):
        raise CheckpointError(f"load_training: parameters missing in the checkpoint: {missing or 'none'}; not "
                              f"in these params: {unexpected or 'none'} (map Flax module paths to torch "
                              "module paths with names=)")
    leaves = []
    for path, x in _leaves_with_paths(params):
        name, layout = rules[path]
        leaves.append(_to_flax(data["params"][name], layout, x) if name in data["params"] else x)
    new_params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)
    opt_state = load_optimizer_state(params, opt_state, data["optimizer"], names)
    prec_state = _rename_modules(_masters_from_torch(data["precision"], params, names), names, to_torch=False)
    if variables is None:
        return new_params, precision.load_state_dict(prec_state, opt_state, strict=strict)[0]
    if isinstance(variables, Mapping) and "params" in variables:
        variables = {**variables, "params": new_params}
    opt_state, variables = precision.load_state_dict(prec_state, opt_state, variables, strict=strict)
    return new_params, opt_state, variables
