"""The default matrix (policies x models) and the runner that turns it into Records.

The matrix is every preset plus combinations the presets do not cover: a per-module
override (head kept in float32), fast loss-scale growth from a scale that is not a power of
two (so growth is exercised within a few steps and the unscaling reciprocal is inexact), master weights, mixed + quantized and mixed + FP8.  Policies that need float64
run last because a JAX backend may have to switch ``jax_enable_x64`` on for them.

The *default* matrix is lean so that it finishes in about two minutes on a 2-core CPU:
every policy runs on the MLP, the transformer and the CNN run under a few representative
policies (:data:`REPRESENTATIVE`), float64 policies run on the MLP only.  Policies that
cannot run here are skip records on every model (they cost nothing).  ``full=True``
(``dualprec conformance --full``) and any explicit ``--policy``/``--model`` selection run
the whole cross product.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from dualprec import LossScaleConfig, Policy, presets

from .backends.base import Backend
from .checks import Context, run_checks
from .records import Record
from .weights import WeightMap
from .zoo import MODELS, canonical_weights, get

#: label -> policy string of the combinations beyond the preset table.
COMBINATIONS = {
    "bf16-mixed+head-f32": "bf16-mixed,@head=(params=float32,compute=float32,output=float32)",
    "16-mixed+growth2": None,  # built below: dynamic scaling with growth_interval=2
    "bf16-true+master": "params=bfloat16,compute=bfloat16,output=float32,master=true",
    "bf16-mixed+nf4": "bf16-mixed,quant=nf4",
    "bf16-mixed+fp8": "bf16-mixed,fp8=delayed",
    # block-scaled recipes (docs/block-scaling.md): --full only, see FULL_ONLY
    "bf16-mixed+rowwise": "bf16-mixed,fp8=rowwise",
    "bf16-mixed+mxfp8": "bf16-mixed,fp8=mxfp8",
    "bf16-mixed+nvfp4": "bf16-mixed,fp8=nvfp4",
}

#: combinations the lean default matrix leaves out (``--full`` and an explicit ``--policy``
#: run them): the emulated block-scaled recipes cost 30-100 s per cell on a 2-core CPU,
#: more than the whole lean matrix may take.  Their mutants run them (conformance.mutants).
FULL_ONLY = ("bf16-mixed+rowwise", "bf16-mixed+mxfp8", "bf16-mixed+nvfp4")


#: model -> the policies it runs under in the lean default matrix (the MLP runs under all).
#: One float32 reference, one float16 with dynamic loss scaling, one bfloat16 (mixed for the
#: transformer's attention/norm autocast paths, true half for the CNN's conv backward).
REPRESENTATIVE: dict[str, tuple[str, ...]] = {
    "transformer": ("32-true", "16-mixed", "bf16-mixed"),
    "cnn": ("32-true", "16-mixed", "bf16-true"),
    # hand-written attention/RMSNorm/SwiGLU: torch autocast against dualprec_jax.autocast
    "opbyop": ("32-true", "16-mixed", "bf16-mixed"),
}


def in_lean_matrix(label: str, policy, model: str) -> bool:
    """Whether the lean default matrix runs ``policy`` on ``model``."""
    if label in FULL_ONLY:
        return False
    if model == "mlp" or model not in REPRESENTATIVE:
        return True
    return label in REPRESENTATIVE[model] and not (isinstance(policy, Policy) and policy.needs_x64)


def combination(label: str) -> Policy:
    if label == "16-mixed+growth2":
        # 1000 is not a power of two: unscaling by a badly rounded reciprocal shows
        return presets()["16-mixed"].replace(loss_scale=LossScaleConfig.dynamic(init_scale=1000.0, growth_interval=2))
    return Policy.parse(COMBINATIONS[label])


def default_policies() -> dict[str, Policy]:
    """label -> Policy, float64 policies last."""
    table = dict(presets())
    for label in COMBINATIONS:
        try:
            table[label] = combination(label)
        except ValueError as e:  # a grammar that cannot spell it yet is a visible gap, not a crash
            table[label] = e
    return dict(sorted(table.items(), key=lambda kv: isinstance(kv[1], Policy) and kv[1].needs_x64))


def resolve_policy(text: str) -> tuple[str, Policy]:
    if text in COMBINATIONS:
        return text, combination(text)
    p = Policy.parse(int(text) if text.strip().isdigit() else text)
    return text, p


@dataclasses.dataclass
class Job:
    label: str
    policy: Policy | Exception
    model: str


def jobs(policies: dict[str, Policy], models: Iterable[str]) -> list[Job]:
    return [Job(label, p, m) for label, p in policies.items() for m in models]


def selected_jobs(policies: dict, models: Iterable[str], full: bool, backends) -> list[Job]:
    """The jobs to run: all of them when ``full``, else the lean default matrix (a policy a
    backend cannot run stays on every model: its skip records cost nothing)."""
    every = jobs(policies, models)
    if full:
        return every

    def runnable(p):
        return isinstance(p, Policy) and not any(be.unsupported(p) for be in backends)

    return [j for j in every if (not runnable(j.policy) and j.label not in FULL_ONLY)
            or in_lean_matrix(j.label, j.policy, j.model)]


def run(policies: dict | None = None, models: Iterable[str] = MODELS, *, steps: int = 3,
        backends: tuple[Backend, Backend] | None = None,
        progress: Callable[[Job], None] | None = None, full: bool | None = None, seed: int = 0) -> list[Record]:
    """Run every check of every (policy, model) and return the records.

    ``seed`` picks the weights and the data (0: the seed the golden
    figures refer to).  ``full=None`` means lean for the default matrix (``policies`` None) and full for an
    explicit selection; a lean run keeps skip records of unrunnable policies on every model."""
    if backends is None:
        from .backends import default_backends

        backends = default_backends()
    a, b = backends
    from .tolerances import check_math_modes

    math_mode = check_math_modes({a.name: a.float32_matmul_mode(), b.name: b.float32_matmul_mode()})
    if full is None:
        full = policies is not None
    policies = default_policies() if policies is None else policies
    out: list[Record] = []
    weights_cache = {}
    for job in selected_jobs(policies, models, full, (a, b)):
        if isinstance(job.policy, Exception):
            out.append(Record(job.label, job.model, "policy", "bit-exact", "skip",
                              reason=f"the spec cannot express this combination yet: {job.policy}"))
        else:
            spec = get(job.model)
            if job.model not in weights_cache:
                w = canonical_weights(spec, seed)
                weights_cache[job.model] = (w, WeightMap.auto({k: v.shape for k, v in w.items()}))
            w, wm = weights_cache[job.model]
            ctx = Context(a, b, spec, job.policy, job.label, w, wm, steps=steps, seed=seed, math_mode=math_mode)
            out.extend(run_checks(ctx))
        if progress:
            progress(job)
    return out
