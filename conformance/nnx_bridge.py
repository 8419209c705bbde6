"""A Flax nnx model seen as a linen module, for compare(): same numbers, linen's machinery.

``as_linen(model)`` returns a linen module whose ``params`` are the nnx model's
``nnx.Param`` values in linen's spelling (a list member ``blocks[0]`` is ``blocks_0``, an
``nnx.Sequential`` member ``net.layers[0]`` is ``net/layers_0``), and in which every nnx
submodule call runs through a linen proxy module of that name: Flax's
``capture_intermediates`` and ``nn.intercept_methods`` see each nnx layer as they see a
linen one, so the per-layer checks (each layer's output, a layer run on the other side's
input, a block's own ops) work for nnx as for linen.

Under a dualprec ``Precision`` (its linen interceptor is active when the wrapper runs) the
nnx model is first put under the policy with ``dualprec_jax.flax_nnx.setup``, as
``Precision.setup`` does: its stock layers round once, in the policy's dtypes.  The call
itself runs inside ``Precision.apply``'s op table.

Limits: only ``nnx.Param`` variables are parameters (other variables, a causal mask kept as
an ``nnx.Variable`` say, stay the model's constants; BatchNorm statistics are not updated);
a submodule's ``__call__`` is what is hooked (other methods run inside their caller).
"""

from __future__ import annotations

import threading
from typing import Any

import flax.linen as nn

_CTX = threading.local()


def _route():
    return getattr(_CTX, "route", None)


_HOOKED: dict[type, type] = {}


def _hooked_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` goes through the active route (its linen
    proxy) and is the original outside one."""
    if cls not in _HOOKED:
        original = cls.__call__

        def __call__(self, *args, **kwargs):
            route = _route()
            if route is None or id(self) not in route.paths:
                return original(self, *args, **kwargs)
            return route.call(self, original, args, kwargs)

        _HOOKED[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_conformance_original": cls})
    return _HOOKED[cls]


def _linen_name(keys) -> str:
    return "_".join(str(k) for k in keys)


class _Route:
    """One trace of the wrapped model: nnx module id -> its path, the linen proxy stack."""

    def __init__(self, model, called: set | None):
        from flax import nnx

        self.paths, self.modules, self.params = {}, {}, {}
        for keys, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module):
                self.paths[id(node)] = tuple(keys)
                self.modules[tuple(keys)] = node
            elif isinstance(node, nnx.Param):
                self.params[tuple(keys)] = node
        self.called = called  # paths of the modules whose __call__ runs (None: discovering)
        self.seen: set = set()
        self.stack: list = []  # (proxy, nnx path) of the calls in progress
        self.proxies: dict = {}
        self.originals: dict = {}

    def call(self, module, original, args, kwargs):
        path = self.paths[id(module)]
        if self.called is None:  # discovery: run as written, note the call
            self.seen.add(path)
            return original(module, *args, **kwargs)
        self.originals[path] = original
        proxy = self.proxies.get(path)
        if proxy is None:
            _, parent_path = self.stack[-1]
            proxy = _Proxy(key=path, name=_linen_name(path[len(parent_path):]))
            self.proxies[path] = proxy
        return proxy(*args, **kwargs)

    def owned(self, path: tuple) -> dict:
        """The params the proxy of ``path`` declares: those of the module itself and of its
        descendants no proxy will declare (modules whose ``__call__`` never runs), nested by
        their relative linen names; the nnx ``Param`` of each leaf beside it."""
        out = {}
        for keys, param in self.params.items():
            owner = keys[:-1]
            if owner[:len(path)] != path:
                continue
            # the nearest called module at or above the owner (the root counts as called)
            anc = max((owner[:i] for i in range(len(path), len(owner) + 1)
                       if owner[:i] == path or owner[:i] in self.called), key=len)
            if anc != path:
                continue
            node, rest = out, owner[len(path):]
            # group uncalled modules under their nearest called ancestor's relative name
            if rest:
                node = node.setdefault(_linen_name(rest), {})
            node[str(keys[-1])] = param
        return out


def _declare(module: nn.Module, route: _Route, path: tuple) -> None:
    """Declare the params of ``path`` on ``module`` (a linen scope) and write the values
    linen hands back (initial values at init, the caller's params at apply) into the nnx
    ``Param`` variables the call reads."""
    import jax

    for name, sub in route.owned(path).items():
        leaves = sub if not hasattr(sub, "get_value") else None
        if leaves is None:  # a Param of the module itself
            value = module.param(name, lambda rng, p=sub: p.get_value())
            sub.set_value(value)
            continue
        values = module.param(name, lambda rng, s=leaves: jax.tree_util.tree_map(
            lambda p: p.get_value(), s, is_leaf=lambda p: hasattr(p, "get_value")))
        jax.tree_util.tree_map(lambda p, v: p.set_value(v), leaves, values,
                               is_leaf=lambda p: hasattr(p, "get_value"))


class _Proxy(nn.Module):
    """The linen stand-in of one nnx submodule call."""

    key: tuple

    @nn.compact
    def __call__(self, *args, **kwargs):  # the nnx call's own arguments: hooks see its input first
        route = _route()
        module, original = route.modules[self.key], route.originals[self.key]
        route.stack.append((self, self.key))
        try:
            _declare(self, route, self.key)
            return original(module, *args, **kwargs)
        finally:
            route.stack.pop()


class NnxModel(nn.Module):
    """The linen wrapper of one nnx model (built by :func:`as_linen`)."""

    graph: Any  # a _Graph: hashable by identity

    @nn.compact
    def __call__(self, *args, **kwargs):
        from flax import nnx

        from .zoo.flax_models import active_policy

        graphdef, state = self.graph.parts
        called = self.graph.called(args, kwargs)
        model = nnx.merge(graphdef, state, copy=True)
        policy = active_policy()
        if policy is not None:
            from dualprec_jax import flax_nnx

            root_cls = type(model)
            model = flax_nnx.setup(model, policy)
            model.__class__ = root_cls  # the op table is Precision.apply's, already around us
        route = _Route(model, called)
        for keys, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and keys:
                node.__class__ = _hooked_class(getattr(type(node), "_conformance_original", type(node)))
        route.stack.append((self, ()))
        previous, _CTX.route = _route(), route
        try:
            _declare(self, route, ())
            return type(model).__call__(model, *args, **kwargs)
        finally:
            _CTX.route = previous


class _Graph:
    """The nnx model split once; hashable by identity (a linen module field)."""

    def __init__(self, model):
        from flax import nnx

        self.parts = nnx.split(model)
        self._called: dict = {}

    def called(self, args, kwargs) -> set:
        """The paths of the submodules whose ``__call__`` runs on inputs of these shapes
        (found once by an abstract run)."""
        import jax
        from flax import nnx

        sig = tuple((getattr(a, "shape", None), str(getattr(a, "dtype", type(a)))) for a in args)
        if sig not in self._called:
            graphdef, state = self.parts

            def run(*xs):
                model = nnx.merge(graphdef, state, copy=True)
                route = _Route(model, None)
                for keys, node in nnx.iter_graph(model):
                    if isinstance(node, nnx.Module) and keys:
                        node.__class__ = _hooked_class(type(node))
                previous, _CTX.route = _route(), route
                try:
                    model(*xs, **kwargs)
                finally:
                    _CTX.route = previous
                self._seen = route.seen
                return 0

            specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a for a in args]
            jax.eval_shape(run, *specs)
            self._called[sig] = set(self._seen) | {()}
        return self._called[sig]


def is_nnx(model) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nnx.Module)


def as_linen(model) -> NnxModel:
    """``model`` (an nnx Module) as a linen module with the same params, layer by layer."""
    return NnxModel(_Graph(model))
