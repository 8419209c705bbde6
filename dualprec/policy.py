"""The Policy value: what precision every part of a training step uses, as pure data.

A Policy never imports torch or JAX.  It is frozen and hashable, validated once when it is
built (``__post_init__`` calls :func:`validate`), and every other representation (strings,
dicts, JSON, TOML, the dialects of jmp, Keras and Lightning Fabric) converts to and from it.

Example::

    >>> p = Policy.parse("bf16-mixed")
    >>> p.param_dtype, p.compute_dtype, p.output_dtype, p.reduce_dtype
    ('float32', 'bfloat16', 'float32', 'float32')
    >>> q = Policy.parse("params=f32,compute=bf16,quant=nf4-dq,@lm_head=(quant=none)")
    >>> q.for_module("lm_head").quantization is None
    True
    >>> Policy.parse(str(q)) == q
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .dtypes import FLOAT_DTYPES, HALF_DTYPES, canonical_dtype
from .errors import PolicyError

__all__ = [
    "LossScale", "Quantization", "FP8Recipe", "Policy",
    "LOSS_SCALE_KINDS", "QUANT_MODES", "FOUR_BIT_MODES", "INT8_MODES", "BLOCKSIZES",
    "FP8_SCALINGS", "FP8_FORMATS", "BLOCK_SCALINGS", "ALL_FP8_SCALINGS", "MX_ROUNDINGS", "NVFP4_WEIGHT_BLOCKS", "FP8_ENGINES", "AMAX_ALGOS", "SCHEMA_VERSION", "NONFINITE_RULES",
]

SCHEMA_VERSION = 1

LOSS_SCALE_KINDS = ("none", "static", "dynamic")
FOUR_BIT_MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq")
INT8_MODES = ("int8", "int8-training")
QUANT_MODES = FOUR_BIT_MODES + INT8_MODES
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FP8_SCALINGS = ("delayed", "current")
FP8_FORMATS = ("hybrid", "e4m3")
#: block-scaled and row-wise recipes (docs/block-scaling.md); FP8_SCALINGS are the per-tensor ones
BLOCK_SCALINGS = ("rowwise", "rowwise_with_gw_hp", "mxfp8", "nvfp4")
ALL_FP8_SCALINGS = FP8_SCALINGS + BLOCK_SCALINGS
#: how an MXFP8 block's E8M0 scale is rounded (torchao's ScaleCalculationMode names)
MX_ROUNDINGS = ("rceil", "floor", "ceil", "even")
#: NVFP4 weight block shapes: 1x16 (like activations) or 16x16 (NVIDIA's training recipe)
NVFP4_WEIGHT_BLOCKS = ("16x16", "1x16")
FP8_ENGINES = ("auto", "transformer-engine", "native")
AMAX_ALGOS = ("max", "most_recent")
#: what an optimizer step does with non-finite gradients (see Policy.nonfinite_rule)
NONFINITE_RULES = ("apply", "skip", "raise")


# The dtypes the backends store these settings in: a float32 scale (whose reciprocal must be a
# normal float32 too: XLA flushes float32 subnormals to zero), an int32 counter and interval.
FLOAT32_MAX = 3.4028234663852886e38
#: the loss scales (init, min, max) a policy may set: normal float32 numbers with a normal reciprocal
SCALE_RANGE = (2.0**-126, 2.0**126)
INT32_MAX = 2**31 - 1
#: FP8 delayed scaling: the longest amax history (allocated per FP8 tensor) and the largest margin
#: (the scale is divided by 2**margin in float32; beyond 32 it underflows for ordinary amax values)
MAX_HISTORY_LEN = 2**16
MAX_MARGIN = 32


def _f32(x: float) -> float:
    """``x`` rounded to float32 (inf beyond its range, 0 below its smallest subnormal)."""
    import struct

    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _in_range(value, lo, hi, what: str, kind: str, shown: str | None = None) -> None:
    """PolicyError naming ``what`` and the valid range when ``value`` (as stored: ``kind``
    "float32" or "int32") lies outside [lo, hi] (None: open)."""
    stored = _f32(value) if kind == "float32" else value
    ok = (not isinstance(stored, float) or math.isfinite(stored)) and (lo is None or stored >= lo) and \
        (hi is None or stored <= hi)
    if not ok:
        show = _show(value)
        if kind == "float32" and stored != value:
            show += f" (as float32: {_show(stored)})"
        article = "an" if kind[0] in "aeiou" else "a"
        raise PolicyError(f"{what}={show} is out of range: {article} {kind} in {shown or f'[{_show(lo)}, {_show(hi)}]'}")


def _show(x) -> str:
    if x is None:
        return "..."
    if isinstance(x, float) and x > 0 and math.isfinite(x):
        m, e = math.frexp(x)
        if m == 0.5 and abs(e - 1) >= 16:
            return f"2**{e - 1}"
    if isinstance(x, int) and x == INT32_MAX:
        return "2**31-1"
    return repr(x) if not isinstance(x, int) or abs(x) < 10**12 else f"{str(x)[:12]}...({len(str(x))} digits)"


def _replace(obj, **changes):
    return dataclasses.replace(obj, **changes)


def _number(value: Any, what: str, *, integer: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{what} must be a number, got {value!r}")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise PolicyError(f"{what} must be an integer, got {value!r}")
            value = int(value)
        return int(value)
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise PolicyError(f"{what}={_show(value)} is out of range (beyond any float)") from None


@dataclass(frozen=True)
class LossScale:
    """Loss scaling: ``none``, ``static`` (``init_scale`` is the scale) or ``dynamic``.

    Dynamic follows the one rule of docs/contract.md (torch.amp.GradScaler's, plus optional clamps):
    a step whose scaled gradients are all finite increments a counter and, every
    ``growth_interval`` finite steps, multiplies the scale by ``growth_factor`` (if the
    product is finite); a non-finite step is skipped, multiplies the scale by
    ``backoff_factor`` and resets the counter.  ``min_scale`` / ``max_scale`` clamp it.
    """

    kind: str = "none"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float | None = None
    max_scale: float | None = None

    def __post_init__(self):
        kind = str(self.kind).strip().lower()
        if kind not in LOSS_SCALE_KINDS:
            raise PolicyError(f'loss_scale: unknown kind "{self.kind}"; use none, static or dynamic')
        object.__setattr__(self, "kind", kind)
        for name in ("init_scale", "growth_factor", "backoff_factor"):
            object.__setattr__(self, name, _number(getattr(self, name), f"loss_scale.{name}"))
        object.__setattr__(self, "growth_interval",
                           _number(self.growth_interval, "loss_scale.growth_interval", integer=True))
        for name in ("min_scale", "max_scale"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _number(getattr(self, name), f"loss_scale.{name}"))
        _validate_loss_scale(self)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @classmethod
    def none(cls) -> LossScale:
        return cls("none")

    @classmethod
    def static(cls, scale: float) -> LossScale:
        return cls("static", init_scale=scale)

    @classmethod
    def dynamic(cls, **kwargs) -> LossScale:
        return cls("dynamic", **kwargs)

    def to_dict(self) -> dict:
        if self.kind == "none":
            return {"kind": "none"}
        if self.kind == "static":
            return {"kind": "static", "init_scale": self.init_scale}
        return dataclasses.asdict(self)


def _validate_loss_scale(ls: LossScale) -> None:
    defaults = LossScale.__dataclass_fields__
    if ls.kind == "none":
        if any(getattr(ls, f) != defaults[f].default for f in defaults if f != "kind"):
            raise PolicyError("loss_scale: settings were given but kind is none; use kind='dynamic' or 'static'")
        return
    _in_range(ls.init_scale, *SCALE_RANGE, "loss_scale.init_scale", "float32")
    if ls.kind == "static":
        if any(getattr(ls, f) != defaults[f].default for f in defaults if f not in ("kind", "init_scale")):
            raise PolicyError("loss_scale: growth/backoff/interval/min/max apply to dynamic scaling, not static")
        return
    if not ls.growth_factor > 1.0:
        raise PolicyError(f"loss_scale.growth_factor={_show(ls.growth_factor)} is out of range: a number in (1, 2**126]")
    _in_range(ls.growth_factor, 1.0, SCALE_RANGE[1], "loss_scale.growth_factor", "float32", "(1, 2**126]")
    if not ls.backoff_factor < 1.0:
        raise PolicyError(f"loss_scale.backoff_factor={_show(ls.backoff_factor)} is out of range: a number in "
                          "[2**-24, 1)")
    _in_range(ls.backoff_factor, 2.0**-24, 1.0, "loss_scale.backoff_factor", "float32", "[2**-24, 1)")
    _in_range(ls.growth_interval, 1, INT32_MAX, "loss_scale.growth_interval", "int32")
    init = _f32(ls.init_scale)
    if ls.min_scale is not None:
        _in_range(ls.min_scale, SCALE_RANGE[0], init, "loss_scale.min_scale", "float32")
    if ls.max_scale is not None:
        _in_range(ls.max_scale, init, SCALE_RANGE[1], "loss_scale.max_scale", "float32")


@dataclass(frozen=True)
class Quantization:
    """bitsandbytes-compatible weight quantization of linear layers.

    ``mode``: nf4 / fp4 (4-bit blockwise, ``-dq`` adds double quantization of the absmax),
    int8 (LLM.int8 inference) or int8-training (LLM.int8 with trainable fp16 weights).
    ``blocksize`` applies to the 4-bit modes, ``threshold`` (outlier threshold) to int8.
    ``skip`` lists module-path patterns (fnmatch, dotted paths) left unquantized.
    """

    mode: str
    blocksize: int = 64
    threshold: float = 6.0
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        mode = str(self.mode).strip().lower()
        if mode not in QUANT_MODES:
            from .errors import did_you_mean
            raise PolicyError(f'quant: unknown mode "{self.mode}"{did_you_mean(mode, QUANT_MODES)}; '
                              f"use one of {', '.join(QUANT_MODES)} or none")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "blocksize", _number(self.blocksize, "quant.blocksize", integer=True))
        object.__setattr__(self, "threshold", _number(self.threshold, "quant.threshold"))
        if not isinstance(self.skip, (str, list, tuple)):
            raise PolicyError(f"quant.skip must be a pattern or a list of patterns, got {self.skip!r}")
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        for pattern in skip:
            _check_pattern(pattern, "quant.skip")
        object.__setattr__(self, "skip", skip)
        if self.blocksize not in BLOCKSIZES:
            raise PolicyError(f"quant: blocksize {self.blocksize} is not supported by bitsandbytes; "
                              f"use one of {', '.join(map(str, BLOCKSIZES))}")
        if self.is_4bit and self.threshold != 6.0:
            raise PolicyError(f"quant: threshold is the LLM.int8 outlier threshold; {mode} has none")
        if not self.is_4bit and self.blocksize != 64:
            raise PolicyError(f"quant: blocksize applies to 4-bit modes; {mode} quantizes per row")
        _in_range(self.threshold, 0.0, FLOAT32_MAX, "quant.threshold", "float32", "[0, 3.4e38]")

    @property
    def is_4bit(self) -> bool:
        return self.mode in FOUR_BIT_MODES

    @property
    def quant_type(self) -> str:
        """bitsandbytes' ``quant_type``: "nf4", "fp4" or "int8"."""
        return self.mode.split("-")[0]

    @property
    def double_quant(self) -> bool:
        return self.mode.endswith("-dq")

    def skips(self, module_path: str) -> bool:
        return any(_path_matches(module_path, p) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "skip": list(self.skip)}
        if self.is_4bit:
            d["blocksize"] = self.blocksize
        else:
            d["threshold"] = self.threshold
        return d


@dataclass(frozen=True)
class FP8Recipe:
    """Low-precision matmuls.  Per-tensor FP8: ``delayed`` (Transformer Engine's DelayedScaling:
    scale from the amax history of previous steps) and ``current`` (scale from the tensor's own
    amax).  ``format`` hybrid = E4M3 forward, E5M2 gradients; e4m3 = E4M3 everywhere.
    ``engine``: auto picks Transformer Engine where installed and on a GPU, the native path
    (torch._scaled_mm, XLA fp8 dot_general) otherwise.

    Block-scaled and row-wise recipes (docs/block-scaling.md says what each library means by
    these names and which variant dualprec means):

    * ``rowwise`` / ``rowwise_with_gw_hp``: torchao's FP8 recipes of those names (one
      power-of-two float32 scale per row of each GEMM operand, along the reduction axis;
      ``rowwise_with_gw_hp`` computes the weight gradient in high precision).  Format e4m3.
    * ``mxfp8``: OCP MX, E8M0 scales over blocks of 32 along the reduction axis, E4M3 codes
      (``format=hybrid``: E5M2 output gradients); ``rounding`` is how a block scale is rounded
      (rceil, floor, ceil, even: torchao's ScaleCalculationMode), default rceil.
    * ``nvfp4``: E2M1 codes, E4M3 scales over blocks of 16 plus a float32 tensor scale.
      ``sr``: stochastic rounding of the gradients (default on); ``rht``: the random Hadamard
      transform of the weight-gradient GEMM's operands (default on); ``weight_blocks``:
      16x16 (default) or 1x16 weight blocks.  The defaults are NVIDIA's recipe (TE's
      NVFP4BlockScaling); the canonical string always spells all three out.
    """

    scaling: str = "delayed"
    history_len: int = 1024
    margin: int = 0
    amax_algo: str = "max"
    format: str | None = None
    engine: str = "auto"
    rounding: str | None = None
    sr: bool | None = None
    rht: bool | None = None
    weight_blocks: str | None = None

    def __post_init__(self):
        scaling = str(self.scaling).strip().lower()
        fmt_default = {"rowwise": "e4m3", "rowwise_with_gw_hp": "e4m3", "mxfp8": "e4m3",
                       "nvfp4": "e2m1"}.get(scaling, "hybrid")
        if self.format is None:
            object.__setattr__(self, "format", fmt_default)
        formats = {"nvfp4": ("e2m1",), "rowwise": ("e4m3",),
                   "rowwise_with_gw_hp": ("e4m3",)}.get(scaling, FP8_FORMATS)
        for name, allowed in (("scaling", ALL_FP8_SCALINGS), ("amax_algo", AMAX_ALGOS),
                              ("format", formats), ("engine", FP8_ENGINES)):
            value = str(getattr(self, name)).strip().lower()
            if name == "engine" and value in ("te", "transformer_engine"):
                value = "transformer-engine"
            if value not in allowed:
                from .errors import did_you_mean
                where = f" for {scaling}" if name == "format" else ""
                raise PolicyError(f'fp8: unknown {name} "{getattr(self, name)}"{where}'
                                  f"{did_you_mean(value, allowed)}; use one of {', '.join(allowed)}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "history_len", _number(self.history_len, "fp8.history_len", integer=True))
        object.__setattr__(self, "margin", _number(self.margin, "fp8.margin", integer=True))
        _in_range(self.history_len, 1, MAX_HISTORY_LEN, "fp8.history_len", "int32")
        _in_range(self.margin, 0, MAX_MARGIN, "fp8.margin", "int32")
        if self.scaling != "delayed" and (self.history_len != 1024 or self.amax_algo != "max" or self.margin != 0):
            raise PolicyError(f"fp8: history_len, margin and amax_algo belong to delayed scaling; "
                              f"{self.scaling} scaling uses each tensor's own amax")
        self._block_options()

    def _block_options(self) -> None:
        s = self.scaling
        rounding = self.rounding
        if rounding is not None:
            if s != "mxfp8":
                raise PolicyError(f"fp8: rounding (of MX block scales) applies to mxfp8, not {s}")
            rounding = str(rounding).strip().lower()
            if rounding not in MX_ROUNDINGS:
                from .errors import did_you_mean
                raise PolicyError(f'fp8: unknown mxfp8 rounding "{self.rounding}"{did_you_mean(rounding, MX_ROUNDINGS)}; '
                                  f"use one of {', '.join(MX_ROUNDINGS)}")
        elif s == "mxfp8":
            rounding = "rceil"
        object.__setattr__(self, "rounding", rounding)
        for name in ("sr", "rht", "weight_blocks"):
            if getattr(self, name) is not None and s != "nvfp4":
                raise PolicyError(f"fp8: {name} applies to nvfp4, not {s}")
        if s != "nvfp4":
            return
        for name in ("sr", "rht"):
            v = getattr(self, name)
            if v is None:
                v = True
            if not isinstance(v, bool):
                raise PolicyError(f"fp8: nvfp4 {name} must be true or false, got {v!r}")
            object.__setattr__(self, name, v)
        wb = "16x16" if self.weight_blocks is None else str(self.weight_blocks).strip().lower()
        if wb not in NVFP4_WEIGHT_BLOCKS:
            raise PolicyError(f'fp8: nvfp4 weight_blocks "{self.weight_blocks}" is not one of '
                              f"{', '.join(NVFP4_WEIGHT_BLOCKS)}")
        object.__setattr__(self, "weight_blocks", wb)

    @property
    def block_scaled(self) -> bool:
        """A row-wise or block-scaled recipe (not one per-tensor scale)."""
        return self.scaling in BLOCK_SCALINGS

    def to_dict(self) -> dict:
        if self.scaling == "delayed":
            return {k: getattr(self, k) for k in ("scaling", "history_len", "margin", "amax_algo",
                                                    "format", "engine")}
        d: dict[str, Any] = {"scaling": self.scaling, "format": self.format, "engine": self.engine}
        if self.scaling == "mxfp8":
            d["rounding"] = self.rounding
        if self.scaling == "nvfp4":
            d.update(sr=self.sr, rht=self.rht, weight_blocks=self.weight_blocks)
        return d


def _check_pattern(pattern: Any, what: str) -> None:
    if not isinstance(pattern, str) or not pattern.strip():
        raise PolicyError(f"{what}: a module-path pattern must be a non-empty string, got {pattern!r}")
    bad = set(pattern) & set(",=()@ \t|")
    if bad:
        raise PolicyError(f"{what}: pattern {pattern!r} contains {''.join(sorted(bad))!r}; "
                          "patterns are dotted module paths with fnmatch wildcards (*, ?, [..])")


def _path_matches(path: str, pattern: str) -> bool:
    """A pattern matches a module and everything inside it ("head" matches "head.proj")."""
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


@dataclass(frozen=True)
class Policy:
    """One precision policy, for both backends.

    Dtypes are canonical names ("float32", "bfloat16", "float16", "float64"); aliases and
    dtype objects are accepted and normalised.  Like jmp, ``compute_dtype`` defaults to
    ``param_dtype`` and ``output_dtype`` to ``compute_dtype``; ``reduce_dtype`` (gradient
    reduction in sharded training, FSDP2's) defaults to ``param_dtype``.

    ``master_weights`` keeps fp32 copies of half-precision parameters for the optimizer.
    ``overrides`` maps module-path patterns (fnmatch over dotted paths; a pattern covers
    the module's children; the first matching pattern wins) to the policy those modules
    use.  Loss scaling, master weights and the non-finite rule are global: an override
    inherits them.

    ``nonfinite``: what a step does when a gradient is inf/NaN: "apply" it (torch without a
    GradScaler), "skip" it, or "raise" naming the first such parameter.  None (the default)
    means the policy's own rule: skip with loss scaling (backing off needs a skipped step),
    apply without.  The default rule is stored as None, so spelling it out changes nothing.
    """

    param_dtype: str = "float32"
    compute_dtype: str | None = None
    output_dtype: str | None = None
    reduce_dtype: str | None = None
    loss_scale: LossScale = field(default_factory=LossScale)
    quantization: Quantization | None = None
    fp8: FP8Recipe | None = None
    master_weights: bool = False
    nonfinite: str | None = None
    overrides: tuple[tuple[str, Policy], ...] = ()

    def __post_init__(self):
        param = canonical_dtype(self.param_dtype, what="param_dtype")
        compute = param if self.compute_dtype is None else canonical_dtype(self.compute_dtype, what="compute_dtype")
        output = compute if self.output_dtype is None else canonical_dtype(self.output_dtype, what="output_dtype")
        reduce = param if self.reduce_dtype is None else canonical_dtype(self.reduce_dtype, what="reduce_dtype")
        for name, value in (("param_dtype", param), ("compute_dtype", compute),
                            ("output_dtype", output), ("reduce_dtype", reduce)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "loss_scale", _coerce(self.loss_scale, LossScale, "loss_scale"))
        object.__setattr__(self, "quantization", _coerce(self.quantization, Quantization, "quantization"))
        object.__setattr__(self, "fp8", _coerce(self.fp8, FP8Recipe, "fp8"))
        if not isinstance(self.master_weights, bool):
            raise PolicyError(f"master_weights must be true or false, got {self.master_weights!r}")
        object.__setattr__(self, "nonfinite", _nonfinite(self.nonfinite, self.loss_scale))
        object.__setattr__(self, "overrides", self._normalise_overrides(self.overrides))
        _validate(self)

    def _normalise_overrides(self, overrides) -> tuple:
        items = overrides.items() if isinstance(overrides, Mapping) else overrides
        out, seen = [], set()
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise PolicyError(f"overrides: expected (pattern, policy) pairs, got {item!r}")
            pattern, sub = item
            _check_pattern(pattern, "overrides")
            if pattern in seen:
                raise PolicyError(f"overrides: pattern {pattern!r} is given twice")
            seen.add(pattern)
            sub = sub if isinstance(sub, Policy) else Policy.parse(sub)
            if sub.overrides:
                raise PolicyError(f"overrides: the policy for {pattern!r} has overrides of its own; "
                                  "list every pattern at the top level")
            if sub.loss_scale.enabled and sub.loss_scale != self.loss_scale:
                raise PolicyError(f"overrides: {pattern!r} sets loss_scale={sub.loss_scale.kind}, but loss "
                                  "scaling is global (one scale for the whole loss); set it on the top-level policy")
            if sub.nonfinite is not None and sub.nonfinite != self.nonfinite:
                raise PolicyError(f"overrides: {pattern!r} sets nonfinite={sub.nonfinite}, but the non-finite "
                                  "rule is global (one decision per step); set it on the top-level policy")
            sub = _replace(sub, loss_scale=self.loss_scale, master_weights=self.master_weights,
                           nonfinite=self.nonfinite)
            out.append((pattern, sub))
        return tuple(out)

    # ----- construction from every spelling -------------------------------------------
    @classmethod
    def parse(cls, value: Any) -> Policy:
        """A Policy from a string (any dialect), an int (Fabric), a dict or a Policy."""
        from .grammar import parse_policy

        return parse_policy(value)

    @classmethod
    def from_dict(cls, data: Mapping) -> Policy:
        from .serialize import policy_from_dict

        return policy_from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        from .serialize import policy_from_json

        return policy_from_json(text)

    @classmethod
    def load(cls, path) -> Policy:
        """Load a policy from a .json or .toml file (no code is executed)."""
        from .serialize import load_policy

        return load_policy(path)

    def to_dict(self) -> dict:
        from .serialize import policy_to_dict

        return policy_to_dict(self)

    def to_json(self, **kwargs) -> str:
        from .serialize import policy_to_json

        return policy_to_json(self, **kwargs)

    def save(self, path) -> None:
        from .serialize import save_policy

        save_policy(self, path)

    def __str__(self) -> str:
        from .grammar import format_policy

        return format_policy(self)

    @property
    def name(self) -> str:
        """The canonical string (a preset name where one matches)."""
        return str(self)

    # ----- exports to other dialects --------------------------------------------------
    def to_jmp(self, *, ignore: tuple[str, ...] = ()) -> str:
        from .dialects import to_jmp_string

        return to_jmp_string(self, ignore=ignore)

    def to_keras(self, *, ignore: tuple[str, ...] = ()) -> str:
        from .dialects import to_keras_name

        return to_keras_name(self, ignore=ignore)

    def to_fabric(self, *, ignore: tuple[str, ...] = ()) -> str:
        from .dialects import to_fabric_precision

        return to_fabric_precision(self, ignore=ignore)

    # ----- queries the backends use ---------------------------------------------------
    @property
    def is_mixed(self) -> bool:
        """Parameters stored wider than the compute dtype (autocast-style)."""
        return self.param_dtype != self.compute_dtype

    @property
    def nonfinite_rule(self) -> str:
        """"apply", "skip" or "raise": ``nonfinite`` with the default filled in."""
        if self.nonfinite is not None:
            return self.nonfinite
        return "skip" if self.loss_scale.enabled else "apply"

    def policies(self) -> tuple[tuple[str, Policy], ...]:
        """("", the top-level policy without overrides) then (pattern, policy) per override:
        every policy some module may run under."""
        return (("", _replace(self, overrides=())),) + self.overrides

    @property
    def needs_x64(self) -> bool:
        return "float64" in self.dtypes()

    def dtypes(self) -> set[str]:
        """Every dtype name some module of this policy stores, computes, outputs or reduces in.

        Returns:
            The canonical dtype names of the top-level policy and of every override.
        """
        return {d for _, q in self.policies() for d in q._dtype_names()}

    def _dtype_names(self) -> tuple[str, str, str, str]:
        """``(param_dtype, compute_dtype, output_dtype, reduce_dtype)`` typed as names: the
        fields accept None on construction (the jmp defaults) and ``__post_init__`` replaces
        every None, so on a built Policy each is a canonical name."""
        param, compute, output, reduce = self.param_dtype, self.compute_dtype, self.output_dtype, self.reduce_dtype
        assert compute is not None and output is not None and reduce is not None, "Policy built without __post_init__"
        return param, compute, output, reduce

    def for_module(self, path: str) -> Policy:
        """The policy that applies to the module at ``path`` (dotted, e.g. "blocks.0.attn")."""
        for pattern, sub in self.overrides:
            if _path_matches(path, pattern):
                return sub
        return self if not self.overrides else _replace(self, overrides=())

    def unmatched_overrides(self, module_paths) -> list[str]:
        """The override patterns that match none of ``module_paths`` (dotted paths)."""
        paths = [p for p in module_paths if p]
        return [pat for pat, _ in self.overrides if not any(_path_matches(p, pat) for p in paths)]

    def check_overrides_match(self, module_paths, where: str = "setup") -> None:
        """PolicyError naming each override that matches no module, with the closest paths:
        a typo in a pattern would otherwise leave that module under the wrong policy."""
        paths = sorted({p for p in module_paths if p})
        self.check_skips_match(paths, where)
        bad = self.unmatched_overrides(paths)
        if not bad:
            return
        lines = _nearest_paths(bad, paths, prefix="@")
        raise PolicyError(f"{where}: override pattern{'s' if len(bad) > 1 else ''} {'; '.join(lines)} "
                          f"match{'es' if len(bad) == 1 else ''} no module of this model; fix the pattern "
                          "(dotted module paths, fnmatch wildcards)")

    def check_skips_match(self, module_paths, where: str = "setup") -> None:
        """A ``quant=...(skip=...)`` pattern that matches no module quantizes the layer it
        meant to keep: PolicyError naming the closest paths, as for overrides."""
        paths = sorted({p for p in module_paths if p})
        skips = [pat for _, p in ((None, self), *self.overrides) if p.quantization is not None
                 for pat in p.quantization.skip]
        bad = [pat for pat in dict.fromkeys(skips) if not any(_path_matches(p, pat) for p in paths)]
        if not bad:
            return
        lines = _nearest_paths(bad, paths)
        raise PolicyError(f"{where}: quant skip pattern{'s' if len(bad) > 1 else ''} {'; '.join(lines)} "
                          f"match{'es' if len(bad) == 1 else ''} no module of this model, so nothing is kept out "
                          "of quantization; fix the pattern (dotted module paths, fnmatch wildcards, e.g. "
                          "skip=*lm_head)")

    def quantizes(self, path: str) -> bool:
        q = self.for_module(path).quantization
        return q is not None and not q.skips(path)

    def replace(self, **changes) -> Policy:
        return _replace(self, **changes)

    def check(self, caps) -> Any:
        """Can a device with capabilities ``caps`` run this policy? See dualprec.capabilities."""
        from .capabilities import check_policy

        return check_policy(self, caps)


def _nonfinite(value, loss_scale: LossScale) -> str | None:
    if value is None:
        return None
    rule = str(value).strip().lower()
    if rule not in NONFINITE_RULES:
        from .errors import did_you_mean
        raise PolicyError(f'nonfinite: unknown rule "{value}"{did_you_mean(rule, NONFINITE_RULES)}; '
                          f"use one of {', '.join(NONFINITE_RULES)}")
    default = "skip" if loss_scale.enabled else "apply"
    if loss_scale.enabled and rule == "apply":
        raise PolicyError("nonfinite=apply with loss scaling: an overflow under loss scaling must skip the "
                          "step (the scale backs off and the step is retried at the lower scale); use skip "
                          "or raise, or loss_scale=none")
    return None if rule == default else rule


def _coerce(value, cls, what):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        from .serialize import component_from_dict

        return component_from_dict(cls, value, what)
    if isinstance(value, str):
        from .grammar import parse_component

        return parse_component(cls, value, what)
    raise PolicyError(f"{what}: expected {cls.__name__}, a dict or a string, got {value!r}")


def _validate(p: Policy) -> None:
    """Contradictions between fields (each field validated itself on construction)."""
    q = p.quantization
    if q is not None:
        if q.is_4bit and p.compute_dtype == "float64":
            raise PolicyError(f"quant={q.mode} computes in the dequantized compute dtype; bitsandbytes "
                              "has no float64 kernels. Use compute=float32, bfloat16 or float16")
        if not q.is_4bit and p.compute_dtype not in HALF_DTYPES:
            raise PolicyError(f"quant={q.mode} (LLM.int8) runs on float16/bfloat16 activations, but "
                              f"compute={p.compute_dtype}; use compute=float16 (bitsandbytes' default) or bfloat16")
        if p.param_dtype == "float64":
            raise PolicyError(f"quant={q.mode}: the unquantized parameters cannot be float64; bitsandbytes has "
                              "no float64 kernels")
    if p.fp8 is not None and "float64" in (p.compute_dtype, p.param_dtype):
        raise PolicyError("fp8 with float64 params/compute: FP8 GEMMs take float32/bfloat16/float16 "
                          "high-precision inputs; use compute=bfloat16 or float32")
    if p.master_weights and p.param_dtype not in HALF_DTYPES:
        raise PolicyError(f"master=true keeps float32 copies of half-precision params, but params are "
                          f"{p.param_dtype} already; drop master or use params=bfloat16/float16")
    if p.loss_scale.enabled and p.param_dtype == "float16" and not p.master_weights:
        raise PolicyError("loss scaling with float16 params gives float16 gradients, which cannot be unscaled "
                          "safely (torch.amp.GradScaler refuses them); use 16-mixed (float32 params) or master=true")
    assert p.param_dtype in FLOAT_DTYPES


def _nearest_paths(patterns, paths, prefix: str = "") -> list[str]:
    """'"pattern" (closest module paths: a, b, c)' for each pattern that matched nothing."""
    from .errors import closest

    out = []
    for pat in patterns:
        near = closest(pat, paths, n=3, cutoff=0.4) or paths[:3]
        out.append(f'"{prefix}{pat}" (closest module paths: '
                   f'{", ".join(near) if near else "the model has no submodules"})')
    return out
