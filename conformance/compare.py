"""``compare``: the conformance checks for a user's own model, written once in each framework.

Example::

    from conformance import compare

    result = compare(torch_model, flax_model, None, "bf16-mixed", x, targets=labels, steps=3)
    assert result.ok, result.explain()

``weight_map`` is None (every name by the rules of :mod:`conformance.weights`: Linear
[out, in] -> Dense kernel [in, out], conv OIHW -> HWIO, norm weight -> scale, Embedding
weight -> embedding), a dict of overrides for :meth:`WeightMap.from_torch`
({"head.weight": "out/kernel"}; None: no counterpart), or a :class:`WeightMap`.
Buffers (a causal mask) are left out, tied parameters compared once.  The torch model's
parameters (as float32) are the weights both sides start from.

Under ``DUALPREC_CONFORMANCE_REORDER=CHUNK`` (see :mod:`conformance.kernels`) the torch side
sums every linear, matmul and convolution in another legitimate order: a pair that passes
there too does not owe its verdict to this machine's kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import textwrap
from typing import Any

import numpy as np

from dualprec import Policy

from .backends.base import Optim
from .checks import Context, _guard, check_casts, check_training, session_checks
from .records import Record, summary
from .tolerances import ModelShape
from .weights import WeightMap
from .zoo import ModelSpec


@dataclasses.dataclass
class Comparison:
    records: list[Record]
    notes: list[str] = dataclasses.field(default_factory=list)  # what compare() left out, and why

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.records)

    def failures(self) -> list[Record]:
        return [r for r in self.records if r.failed]

    def explain(self, width: int = 80) -> str:
        """The summary, then each distinct problem once (the checks it concerns named
        together), wrapped at word boundaries to ``width`` columns; then the notes."""
        counts = summary(self.records)
        lines = [", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no records"]
        groups: dict[tuple, list[str]] = {}
        for r in self.records:
            if r.status == "pass":
                continue
            where = "" if not r.where or f"at {r.where}:" in (r.reason or "") else \
                f" (where: {r.where}" + (f", step {r.step}" if r.step is not None else "") + ")"
            groups.setdefault((r.status, r.reason or "", where), []).append(r.check)
        for (status, reason, where), checks in groups.items():
            head = f"{status} {', '.join(checks)}: "
            lines += textwrap.wrap(head + reason + where, width, subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False) or [head]
        for note in self.notes:
            lines += textwrap.wrap("note: " + note, width, subsequent_indent="    ",
                                   break_long_words=False, break_on_hyphens=False)
        return "\n".join(lines)


def estimate_shape(weights: dict[str, np.ndarray]) -> ModelShape:
    """Tolerance inputs from the weights alone: each matrix is a layer, its fan-in a reduction,
    and each layer is counted as two rounding stages (its matmul and what follows it)."""
    mats = [w for w in weights.values() if w.ndim >= 2]
    n_layers = max(len(mats), 1)
    n_reduce = max((int(np.prod(w.shape[1:])) for w in mats), default=1)
    return ModelShape(n_round=2 * n_layers + 2, n_reduce=n_reduce, n_layers=n_layers)


def infer_class_axis(out_shape: tuple, y_shape: tuple) -> int:
    """Where the classes of a model output ``out_shape`` are, given integer targets of
    ``y_shape``: 1 for [B, C] and torch's [B, C, ...]; -1 for LM logits [B, T, V] with
    targets [B, T].  Raises when neither or both fit (pass ``class_axis``)."""
    if len(out_shape) <= 2:
        return 1
    fits = [a for a in (1, -1) if tuple(np.delete(np.array(out_shape), a % len(out_shape))) == tuple(y_shape)]
    if len(fits) == 1:
        return fits[0]
    raise ValueError(f"model output {list(out_shape)} and targets {list(y_shape)}: "
                     + ("the classes could be at axis 1 or -1" if fits else "no axis of the output is the classes'")
                     + "; pass compare(..., class_axis=1) (torch's cross_entropy layout) or class_axis=-1 "
                     "(optax's, LM logits [B, T, V] with targets [B, T])")


def compare(torch_fn: Any, jax_fn: Any, weight_map: Any, policy: Any, x: np.ndarray, *,
            targets: np.ndarray | None = None, steps: int = 0, lr: float = 0.05,
            channels_last_in_jax: bool = False, class_axis: int | None = None, backends=None,
            name: str = "user-model") -> Comparison:
    """Run ``x`` through ``torch_fn`` (an nn.Module) and ``jax_fn`` (a Flax linen or nnx Module) under
    ``policy`` in both backends and check casts, parameter dtypes and values, the forward
    output (and each named submodule's), and, with integer ``targets``, gradients of the
    cross-entropy loss and ``steps`` SGD steps.  Returns a :class:`Comparison`.

    ``weight_map``: None (every name by rule), overrides for :meth:`WeightMap.from_torch`
    ({"head.weight": "out/kernel", "attn.mask": None}), or a :class:`WeightMap`.  Buffers
    (a causal mask) have no counterpart and are left out; tied parameters (an LM head tied
    to the token embedding) are found from shared storage and compared once.
    ``class_axis``: where a >2-D output holds the classes (1: torch's layout, -1: LM logits
    [B, T, V] with targets [B, T]); None infers it from the shapes."""
    import torch

    pol = policy if isinstance(policy, Policy) else Policy.parse(policy)
    notes = []
    from .nnx_bridge import as_linen, is_nnx

    if is_nnx(jax_fn):  # an nnx model: the same checks through its linen view, layer by layer
        jax_fn = as_linen(jax_fn)
    if isinstance(weight_map, WeightMap):
        wm = weight_map
    else:
        try:
            wm = WeightMap.from_torch(torch_fn, weight_map)
        except KeyError as e:  # a bad entry: one error record, nothing run
            return Comparison([Record(str(pol), name, "compare", "bit-exact", "error", reason=str(e))])
    params = dict(torch_fn.named_parameters())
    # The weights both sides start from: the trained parameters, each tensor once.
    weights = {k: params[k].detach().to(torch.float32).numpy().copy() for k in wm.rules if k in params}
    if wm.ties:
        notes.append("tied, compared once: " + ", ".join(f"{a} = {c}" for a, c in sorted(wm.ties.items())))
    if wm.ignored:
        notes.append("no Flax counterpart, not compared: " + ", ".join(sorted(wm.ignored)))
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):  # token ids pass through uncast
        x = x.astype(np.float32)
    y = None if targets is None else np.asarray(targets, np.int64)
    if class_axis is None:
        class_axis = 1
        if y is not None and y.ndim > 1:
            with torch.no_grad():
                out = copy.deepcopy(torch_fn)(torch.from_numpy(x))
            try:
                class_axis = infer_class_axis(tuple(out.shape), y.shape)
            except ValueError as e:
                return Comparison([Record(str(pol), name, "compare", "bit-exact", "error", reason=str(e))])
    spec = ModelSpec(name, tuple(x.shape), 0, estimate_shape(weights), channels_last_in_jax,
                     build_torch=lambda: copy.deepcopy(torch_fn), build_flax=lambda: jax_fn,
                     input_dtype=x.dtype.name, vocab=int(x.max()) + 1 if x.dtype.kind in "iu" else 0,
                     class_axis=class_axis)
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
        return Comparison([ctx.record("compare", "tolerance", "skip", reason="; ".join(reasons))], notes)
    if getattr(a, "reordered", False) or getattr(b, "reordered", False):
        from .kernels import REORDER_ENV  # imported late: `python -m conformance.kernels` runs that module

        notes.append(f"torch side in the reordering mode ({REORDER_ENV}={os.environ.get(REORDER_ENV)})")
    recs = _guard(ctx, ("cast-input", "cast-output"), check_casts, ctx)

    def pair_checks():
        sa, sb = ctx.sessions(Optim("sgd", lr))
        return session_checks(ctx, sa, sb, with_grads=y is not None)

    recs += _guard(ctx, ("param-dtypes", "param-values", "dtype-flow", "forward", "layers", "gradients", "loss"),
                   pair_checks)
    if y is not None and steps > 0:
        recs += _guard(ctx, ("train-loss", "train-params", "update"), check_training, ctx)
    return Comparison(recs, notes)
