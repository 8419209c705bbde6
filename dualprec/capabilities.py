"""Can a device run a policy, and what is the fallback?  Backends describe the device; the
spec decides, so torch and JAX give the same answer for the same hardware."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PolicyError
from .policy import LossScaleConfig, Policy

__all__ = ["DeviceCaps", "Finding", "CheckReport", "check_policy", "resolve_fp8_engine"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


@dataclass(frozen=True)
class DeviceCaps:
    """What a backend found on the device (``dualprec_torch.device_caps()`` and
    ``dualprec_jax.device_caps()`` build one; tests build their own).

    Attributes:
        platform: "cpu", "cuda", "rocm" or "tpu".
        name: The device's name, used in messages.
        compute_capability: CUDA's (major, minor); required on cuda.
        backend: "torch", "jax", or "" for either.
        bitsandbytes: bitsandbytes is installed.
        transformer_engine: Transformer Engine is installed.
        fp16_autocast: torch's CPU autocast takes float16 (torch >= 2.3).

    Raises:
        PolicyError: An unknown platform, or cuda without a compute capability.
    """

    platform: str
    name: str = ""
    compute_capability: tuple[int, int] | None = None
    backend: str = ""  # "torch" | "jax" | "" (any)
    bitsandbytes: bool = False
    transformer_engine: bool = False
    fp16_autocast: bool = True  # torch CPU autocast takes float16 since 2.3

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise PolicyError(f"DeviceCaps.platform {self.platform!r} must be one of {', '.join(PLATFORMS)}")
        if self.platform == "cuda" and self.compute_capability is None:
            raise PolicyError("DeviceCaps: a cuda device needs its compute_capability, e.g. (9, 0)")

    def cc_at_least(self, major: int, minor: int) -> bool:
        """Whether the CUDA compute capability is at least ``(major, minor)``.

        Args:
            major: The required major version.
            minor: The required minor version.

        Returns:
            False when the device has no compute capability.
        """
        return self.compute_capability is not None and tuple(self.compute_capability) >= (major, minor)


@dataclass(frozen=True)
class Finding:
    """One problem or note of a CheckReport.

    Attributes:
        field: The policy field concerned ("dtype", "fp8", "fp8.engine", "quantization").
        message: What the device lacks or does differently.
    """

    field: str
    message: str


@dataclass(frozen=True)
class CheckReport:
    """Whether a device runs a policy: what `check_policy` and `Policy.check` return.

    Attributes:
        policy: The policy checked.
        ok: The policy runs as written.
        problems: What stops it from running.
        notes: What does not stop it (emulation, slow paths, the engine chosen).
        fallback: The nearest policy the device runs (the policy itself when ``ok``), or
            None when there is none to offer.
    """

    policy: Policy
    ok: bool
    problems: tuple[Finding, ...] = ()
    notes: tuple[Finding, ...] = ()
    fallback: Policy | None = None

    def raise_if_unrunnable(self) -> None:
        """Raise unless the policy runs as written.

        Raises:
            PolicyError: Naming every problem and the fallback, if any.
        """
        if not self.ok:
            lines = "; ".join(f"{f.field}: {f.message}" for f in self.problems)
            hint = f' Fallback: "{self.fallback}".' if self.fallback is not None else ""
            raise PolicyError(f'"{self.policy}" cannot run here: {lines}.{hint}')

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data.

        Returns:
            ``policy`` and ``fallback`` as strings, ``ok``, and the findings as dicts.
        """
        return {"policy": str(self.policy), "ok": self.ok,
                "problems": [dataclasses.asdict(f) for f in self.problems],
                "notes": [dataclasses.asdict(f) for f in self.notes],
                "fallback": None if self.fallback is None else str(self.fallback)}


def resolve_fp8_engine(policy: Policy, caps: DeviceCaps) -> str | None:
    """The FP8 engine a policy uses on a device.

    Args:
        policy: The policy.
        caps: The device.

    Returns:
        The recipe's engine; for ``auto``, "transformer-engine" where Transformer Engine is
        installed on a CUDA device (for a block-scaled recipe: and TE has it with every option,
        on a GPU it runs it on, `dualprec.te_recipes.te_runs_on`), else "native".  None when
        the policy has no FP8 recipe.
    """
    if policy.fp8 is None:
        return None
    if policy.fp8.engine != "auto":
        return policy.fp8.engine
    if not (caps.transformer_engine and caps.platform == "cuda"):
        return "native"
    if policy.fp8.block_scaled:  # TE only where it runs the recipe as defined (dualprec.te_recipes)
        from .te_recipes import te_runs_on

        return "transformer-engine" if te_runs_on(policy.fp8, caps.compute_capability) else "native"
    return "transformer-engine"


def _swap_dtype(p: Policy, old: str, new: str) -> Policy:
    def swap(q: Policy) -> Policy:
        changes: dict[str, Any] = {f: new if getattr(q, f) == old else getattr(q, f)
                   for f in ("param_dtype", "compute_dtype", "output_dtype", "reduce_dtype")}
        out = dataclasses.replace(q, **changes)
        if out.compute_dtype == "float16" and out.param_dtype == "float32" and not out.loss_scale.enabled:
            out = dataclasses.replace(out, loss_scale=LossScaleConfig("dynamic"))  # bf16-mixed -> 16-mixed
        return out

    return _map_all(p, swap)


def check_policy(policy: Policy, caps: DeviceCaps) -> CheckReport:
    """Whether a device runs a policy, and the nearest policy it runs if not.

    Checks bfloat16 (compute capability 8.0 on CUDA), float16 on CPU, float64 (none on
    TPU), FP8 (compute capability 8.9 on CUDA, emulated on CPU and TPU; the engine
    installed) and bitsandbytes for quantization under torch.

    Args:
        policy: The policy to check (every override included).
        caps: The device's capabilities.

    Returns:
        The CheckReport.  Its fallback swaps the dtype the device lacks (bfloat16 to float16
        and back, float64 to float32), drops FP8 or picks the native engine; it is None when
        no swap helps (quantization without bitsandbytes).

    Raises:
        PolicyError: ``caps`` is not a DeviceCaps.
    """
    if not isinstance(caps, DeviceCaps):
        raise PolicyError(f"check() needs a DeviceCaps, got {type(caps).__name__}; backends provide "
                          "dualprec_torch.device_caps() / dualprec_jax.device_caps()")
    problems: list[Finding] = []
    notes: list[Finding] = []
    fallback: Policy | None = policy
    dtypes = policy.dtypes()

    def fail(fieldname: str, message: str, fix: Callable[[Policy], Policy] | None) -> None:
        nonlocal fallback
        problems.append(Finding(fieldname, message))
        fallback = None if (fix is None or fallback is None) else fix(fallback)

    if "bfloat16" in dtypes and caps.platform == "cuda" and not caps.cc_at_least(8, 0):
        fail("dtype", f"bfloat16 needs compute capability >= 8.0 (Ampere); {caps.name or 'this GPU'} has "
             f"{_cc(caps)}", lambda p: _swap_dtype(p, "bfloat16", "float16"))
    if "float16" in dtypes and caps.platform == "cpu":
        if caps.backend == "torch" and not caps.fp16_autocast:
            fail("dtype", "this torch has no float16 autocast on CPU (needs torch >= 2.3)",
                 lambda p: _swap_dtype(p, "float16", "bfloat16"))
        else:
            notes.append(Finding("dtype", "float16 on CPU is computed without half-precision units: "
                                 "same numbers, no speed-up"))
    if "float64" in dtypes:
        if caps.platform == "tpu":
            fail("dtype", "TPUs have no float64", lambda p: _swap_dtype(p, "float64", "float32"))
        elif caps.backend == "jax":
            notes.append(Finding("dtype", "the JAX backend turns on jax_enable_x64 for this policy"))
    if policy.fp8 is not None:
        engine = resolve_fp8_engine(policy, caps)
        if caps.platform == "cuda" and not caps.cc_at_least(8, 9):
            fail("fp8", f"FP8 matmuls need compute capability >= 8.9 (Ada) or 9.0 (Hopper); "
                 f"{caps.name or 'this GPU'} has {_cc(caps)}", lambda p: _drop_fp8(p))
        elif caps.platform in ("cpu", "tpu"):
            notes.append(Finding("fp8", f"FP8 is emulated on {caps.platform} (fp8 casts, wide matmul): the "
                                 "numbers of the recipe, not its speed"))
        if engine == "transformer-engine" and not (caps.transformer_engine and caps.platform == "cuda"):
            why = "is not installed" if not caps.transformer_engine else f"needs a CUDA GPU, not {caps.platform}"
            fail("fp8.engine", f"Transformer Engine {why} (install dualprec[te] on a GPU machine)",
                 lambda p: _set_engine(p, "native"))
        elif engine == "transformer-engine" and policy.fp8.engine != "auto":
            from .te_recipes import TE_CLASSES, TE_MIN_CAPABILITY, te_refusal

            refusal = te_refusal(policy.fp8)
            need = TE_MIN_CAPABILITY[TE_CLASSES[policy.fp8.scaling]] if refusal is None else (0, 0)
            if refusal is not None:
                fail("fp8.engine", refusal, lambda p: _set_engine(p, "native"))
            elif caps.compute_capability is not None and not caps.cc_at_least(*need):
                fail("fp8.engine", f"Transformer Engine runs {TE_CLASSES[policy.fp8.scaling]} on compute "
                     f"capability >= {need[0]}.{need[1]}; {caps.name or 'this GPU'} has {_cc(caps)}: "
                     "use engine=native (emulated)", lambda p: _set_engine(p, "native"))
        elif policy.fp8.engine == "auto":
            notes.append(Finding("fp8.engine", f"auto resolves to {engine} here"))
    if policy.uses_quantization and caps.backend == "torch" and not caps.bitsandbytes:
        fail("quantization", "bitsandbytes is not installed: pip install 'dualprec[bnb]'", None)
    return CheckReport(policy, not problems, tuple(problems), tuple(notes),
                       fallback if problems else policy)


def _cc(caps: DeviceCaps) -> str:
    return "unknown" if caps.compute_capability is None else ".".join(map(str, caps.compute_capability))


def _map_all(p: Policy, fn: Callable[[Policy], Policy]) -> Policy:
    top = fn(dataclasses.replace(p, overrides=()))
    return dataclasses.replace(top, overrides=tuple((pat, fn(s)) for pat, s in p.overrides))


def _drop_fp8(p: Policy) -> Policy:
    return _map_all(p, lambda q: dataclasses.replace(q, fp8=None))


def _set_engine(p: Policy, engine: str) -> Policy:
    return _map_all(p, lambda q: q if q.fp8 is None else dataclasses.replace(
        q, fp8=dataclasses.replace(q.fp8, engine=engine)))
