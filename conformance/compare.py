"""``compare``: the conformance checks for a user's own model, written once in each framework.

Example::

    from conformance import compare

    result = compare(torch_model, flax_model, None, "bf16-mixed", x, targets=labels, steps=3)
    assert result.ok, result.explain()

``weight_map`` is None (names and layouts inferred: Linear [out, in] -> Dense kernel
[in, out], conv OIHW -> HWIO, norm weight -> scale), a dict of overrides for
:meth:`WeightMap.auto` ({"embed.weight": "embed/embedding"}), or a :class:`WeightMap`.
The torch model's weights (as float32) are the weights both sides start from.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from dualprec import Policy

from .checks import Context, _guard, check_casts, check_training, session_checks
from .backends.base import Optim
from .records import Record, summary
from .tolerances import ModelShape
from .weights import WeightMap
from .zoo import ModelSpec


@dataclasses.dataclass
class Comparison:
    records: list[Record]

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.records)

    def failures(self) -> list[Record]:
        return [r for r in self.records if r.failed]

    def explain(self) -> str:
        lines = [f"{summary(self.records)}"]
        lines += [f"{r.check}: {r.reason}" + (f" (where: {r.where}, step {r.step})" if r.where else "")
                  for r in self.records if r.status != "pass"]
        return "\n".join(lines)


def estimate_shape(weights: dict[str, np.ndarray]) -> ModelShape:
    """Tolerance inputs from the weights alone: each matrix is a layer, its fan-in a reduction,
    and each layer is counted as two rounding stages (its matmul and what follows it)."""
    mats = [w for w in weights.values() if w.ndim >= 2]
    n_layers = max(len(mats), 1)
    n_reduce = max((int(np.prod(w.shape[1:])) for w in mats), default=1)
    return ModelShape(n_round=2 * n_layers + 2, n_reduce=n_reduce, n_layers=n_layers)


def compare(torch_fn: Any, jax_fn: Any, weight_map: Any, policy: Any, x: np.ndarray, *,
            targets: np.ndarray | None = None, steps: int = 0, lr: float = 0.05,
            channels_last_in_jax: bool = False, backends=None, name: str = "user-model") -> Comparison:
    """Run ``x`` through ``torch_fn`` (an nn.Module) and ``jax_fn`` (a Flax linen Module) under
    ``policy`` in both backends and check casts, parameter dtypes and values, the forward
    output (and each named submodule's), and, with integer ``targets``, gradients of the
    cross-entropy loss and ``steps`` SGD steps.  Returns a :class:`Comparison`."""
    import torch

    pol = policy if isinstance(policy, Policy) else Policy.parse(policy)
    weights = {k: v.detach().to(torch.float32).numpy().copy() for k, v in torch_fn.state_dict().items()}
    if isinstance(weight_map, WeightMap):
        wm = weight_map
    else:
        kinds = {n: type(m).__name__ for n, m in torch_fn.named_modules() if n}
        wm = WeightMap.auto({k: v.shape for k, v in weights.items()}, weight_map, kinds)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):  # token ids pass through uncast
        x = x.astype(np.float32)
    y = None if targets is None else np.asarray(targets, np.int64)
    spec = ModelSpec(name, tuple(x.shape), 0, estimate_shape(weights), channels_last_in_jax,
                     build_torch=lambda: copy.deepcopy(torch_fn), build_flax=lambda: jax_fn,
                     input_dtype=x.dtype.name, vocab=int(x.max()) + 1 if x.dtype.kind in "iu" else 0)
    if backends is None:
        from .backends import default_backends

        backends = default_backends()
    a, b = backends
    from .tolerances import check_math_modes

    math_mode = check_math_modes({a.name: a.float32_matmul_mode(), b.name: b.float32_matmul_mode()})
    ctx = Context(a, b, spec, pol, str(pol), weights, wm, steps=max(steps, 1), lr=lr,
                  data=lambda i: (x, y if y is not None else np.zeros(x.shape[0], np.int64)),
                  math_mode=math_mode)
    reasons = [f"{be.name}: {r}" for be in (a, b) if (r := be.unsupported(pol))]
    if reasons:
        return Comparison([ctx.record("compare", "tolerance", "skip", reason="; ".join(reasons))])
    recs = _guard(ctx, ("cast-input", "cast-output"), check_casts, ctx)

    def pair_checks():
        sa, sb = ctx.sessions(Optim("sgd", lr))
        return session_checks(ctx, sa, sb, with_grads=y is not None)

    recs += _guard(ctx, ("param-dtypes", "param-values", "dtype-flow", "forward", "layers", "gradients", "loss"),
                   pair_checks)
    if y is not None and steps > 0:
        recs += _guard(ctx, ("train-loss", "train-params", "update"), check_training, ctx)
    return Comparison(recs)
