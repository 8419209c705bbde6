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
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .deprecation import alias_getattr
from .dtypes import FLOAT_DTYPES, HALF_DTYPES, canonical_dtype
from .errors import PolicyError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from .capabilities import CheckReport, DeviceCaps

_Dataclass = TypeVar("_Dataclass", bound="DataclassInstance")

__all__ = [
    "LossScaleConfig", "Quantization", "FP8Recipe", "Policy",
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


def _in_range(value: float, lo: float | None, hi: float | None, what: str, kind: str,
              shown: str | None = None) -> None:
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


def _show(x: float | None) -> str:
    if x is None:
        return "..."
    if isinstance(x, float) and x > 0 and math.isfinite(x):
        m, e = math.frexp(x)
        if m == 0.5 and abs(e - 1) >= 16:
            return f"2**{e - 1}"
    if isinstance(x, int) and x == INT32_MAX:
        return "2**31-1"
    return repr(x) if not isinstance(x, int) or abs(x) < 10**12 else f"{str(x)[:12]}...({len(str(x))} digits)"


def _replace(obj: _Dataclass, **changes: Any) -> _Dataclass:
    """``dataclasses.replace``: a copy with ``changes``, validated by ``__post_init__``."""
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
class LossScaleConfig:
    """Loss scaling: ``none``, ``static`` or ``dynamic``.

    Dynamic follows the one rule of docs/contract.md (torch.amp.GradScaler's, plus optional
    clamps): a step whose scaled gradients are all finite increments a counter and, every
    ``growth_interval`` finite steps, multiplies the scale by ``growth_factor`` (if the
    product is finite); a non-finite step is skipped, multiplies the scale by
    ``backoff_factor`` and resets the counter.

    Attributes:
        kind: "none", "static" or "dynamic".
        init_scale: The static scale, or the first dynamic one: a normal float32 in
            [2**-126, 2**126].
        growth_factor: Dynamic: the factor the scale grows by, in (1, 2**126].
        backoff_factor: Dynamic: the factor a non-finite step multiplies the scale by, in [2**-24, 1).
        growth_interval: Dynamic: finite steps between growths, in [1, 2**31-1].
        min_scale: Dynamic: the scale never backs off below this (None: no floor).
        max_scale: Dynamic: the scale never grows above this (None: no ceiling).

    Raises:
        PolicyError: An unknown kind, a value out of range, or dynamic settings given to
            a static or disabled scale.
    """

    kind: str = "none"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float | None = None
    max_scale: float | None = None

    def __post_init__(self) -> None:
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
        """The loss is scaled (kind static or dynamic)."""
        return self.kind != "none"

    @classmethod
    def none(cls) -> LossScaleConfig:
        """No loss scaling.

        Returns:
            ``LossScaleConfig("none")``.
        """
        return cls("none")

    @classmethod
    def static(cls, scale: float) -> LossScaleConfig:
        """A fixed loss scale.

        Args:
            scale: The scale, a normal float32 in [2**-126, 2**126].

        Returns:
            ``LossScaleConfig("static", init_scale=scale)``.
        """
        return cls("static", init_scale=scale)

    @classmethod
    def dynamic(cls, **kwargs: Any) -> LossScaleConfig:
        """A dynamic loss scale.

        Args:
            **kwargs: ``init_scale``, ``growth_factor``, ``backoff_factor``,
                ``growth_interval``, ``min_scale``, ``max_scale`` (the defaults are torch
                GradScaler's).

        Returns:
            ``LossScaleConfig("dynamic", **kwargs)``.
        """
        return cls("dynamic", **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, for `Policy.to_dict`.

        Returns:
            ``{"kind": ...}`` plus the settings that kind uses.
        """
        if self.kind == "none":
            return {"kind": "none"}
        if self.kind == "static":
            return {"kind": "static", "init_scale": self.init_scale}
        return dataclasses.asdict(self)


def _validate_loss_scale(ls: LossScaleConfig) -> None:
    defaults = LossScaleConfig.__dataclass_fields__
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

    Attributes:
        mode: "nf4" / "fp4" (4-bit blockwise; the ``-dq`` variants also quantize the absmax
            values), "int8" (LLM.int8 inference) or "int8-training" (LLM.int8 with
            trainable fp16 weights).
        blocksize: 4-bit modes: the elements per absmax block (32 to 4096, a power of two).
        threshold: int8 modes: LLM.int8's outlier threshold.
        skip: Module-path patterns (fnmatch over dotted paths) left unquantized.

    Raises:
        PolicyError: An unknown mode, a blocksize bitsandbytes lacks, or a setting the mode
            does not use.
    """

    mode: str
    blocksize: int = 64
    threshold: float = 6.0
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
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
        """An nf4 or fp4 mode (with or without double quantization)."""
        return self.mode in FOUR_BIT_MODES

    @property
    def quant_type(self) -> str:
        """bitsandbytes' ``quant_type``: "nf4", "fp4" or "int8"."""
        return self.mode.split("-")[0]

    @property
    def double_quant(self) -> bool:
        """A ``-dq`` mode: the absmax values are quantized too."""
        return self.mode.endswith("-dq")

    def skips(self, module_path: str) -> bool:
        """Whether a ``skip`` pattern keeps a module out of quantization.

        Args:
            module_path: The module's dotted path.

        Returns:
            True when some ``skip`` pattern matches the module or one of its parents.
        """
        return any(_path_matches(module_path, p) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, for `Policy.to_dict`.

        Returns:
            ``mode``, ``skip`` and the setting the mode uses (``blocksize`` or ``threshold``).
        """
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

    Attributes:
        scaling: "delayed", "current", "rowwise", "rowwise_with_gw_hp", "mxfp8" or "nvfp4".
        history_len: Delayed scaling: the amax history length, in [1, 2**16].
        margin: Delayed scaling: the scale is divided by ``2**margin``, in [0, 32].
        amax_algo: Delayed scaling: "max" (of the history) or "most_recent".
        format: "hybrid" or "e4m3" (delayed, current, mxfp8), "e4m3" (the row-wise
            recipes) or "e2m1" (nvfp4).  None: hybrid for delayed and current, e4m3 for the
            row-wise recipes and mxfp8, e2m1 for nvfp4.
        engine: "auto", "transformer-engine" or "native".
        rounding: mxfp8: the block-scale rounding (None: rceil).
        sr: nvfp4: stochastic rounding of the gradients (None: on).
        rht: nvfp4: the random Hadamard transform (None: on).
        weight_blocks: nvfp4: "16x16" or "1x16" (None: 16x16).

    Raises:
        PolicyError: An unknown name, a value out of range, or a setting the scaling does not use.
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

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, for `Policy.to_dict`.

        Returns:
            ``scaling``, ``format``, ``engine`` and the settings that scaling uses.
        """
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
    """One precision policy, for both backends: a frozen, hashable value validated on construction.

    Like jmp, ``compute_dtype`` defaults to ``param_dtype`` and ``output_dtype`` to
    ``compute_dtype``; ``reduce_dtype`` defaults to ``param_dtype``.  Loss scaling, master
    weights and the non-finite rule are global: an override inherits them.

    Attributes:
        param_dtype: The dtype parameters are stored in.  Every dtype field takes a
            canonical name ("float32", "bfloat16", "float16", "float64"), an alias ("bf16",
            "f32", ...) or a torch/NumPy/JAX dtype, and holds the canonical name.
        compute_dtype: The dtype of the forward computation (None: ``param_dtype``).
        output_dtype: The dtype of the model's outputs (None: ``compute_dtype``).
        reduce_dtype: The dtype of gradient reduction in sharded training, FSDP2's
            (None: ``param_dtype``).
        loss_scale: The LossScaleConfig (or its string or dict form).
        quantization: The weight Quantization of linear layers, or None.
        fp8: The FP8Recipe of low-precision matmuls, or None.
        master_weights: Keep float32 copies of half-precision parameters for the optimizer.
        nonfinite: What a step does when a gradient is inf/NaN: "apply" it (torch without a
            GradScaler), "skip" it, or "raise" naming the first such parameter.  None means
            the policy's own rule (`nonfinite_rule`): skip with loss scaling, apply without;
            the default rule is stored as None, so spelling it out changes nothing.
        overrides: ``(pattern, policy)`` pairs (or a dict): module-path patterns (fnmatch
            over dotted paths; a pattern covers the module's children; the first matching
            pattern wins) and the policy those modules use.

    Raises:
        PolicyError: A field is invalid or two fields contradict each other; the message
            names the field and the fix.
    """

    param_dtype: str = "float32"
    compute_dtype: str | None = None
    output_dtype: str | None = None
    reduce_dtype: str | None = None
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    quantization: Quantization | None = None
    fp8: FP8Recipe | None = None
    master_weights: bool = False
    nonfinite: str | None = None
    overrides: tuple[tuple[str, Policy], ...] = ()

    def __post_init__(self) -> None:
        param = canonical_dtype(self.param_dtype, what="param_dtype")
        compute = param if self.compute_dtype is None else canonical_dtype(self.compute_dtype, what="compute_dtype")
        output = compute if self.output_dtype is None else canonical_dtype(self.output_dtype, what="output_dtype")
        reduce = param if self.reduce_dtype is None else canonical_dtype(self.reduce_dtype, what="reduce_dtype")
        for name, value in (("param_dtype", param), ("compute_dtype", compute),
                            ("output_dtype", output), ("reduce_dtype", reduce)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "loss_scale", _coerce(self.loss_scale, LossScaleConfig, "loss_scale"))
        object.__setattr__(self, "quantization", _coerce(self.quantization, Quantization, "quantization"))
        object.__setattr__(self, "fp8", _coerce(self.fp8, FP8Recipe, "fp8"))
        if not isinstance(self.master_weights, bool):
            raise PolicyError(f"master_weights must be true or false, got {self.master_weights!r}")
        object.__setattr__(self, "nonfinite", _nonfinite(self.nonfinite, self.loss_scale))
        object.__setattr__(self, "overrides", self._normalise_overrides(self.overrides))
        _validate(self)

    def _normalise_overrides(self, overrides: Any) -> tuple[tuple[str, Policy], ...]:
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
        """Build a Policy from any of its spellings.

        Args:
            value: A policy string (a preset name such as "bf16-mixed", a jmp string
                "p=f32,c=bf16,o=f32", a Keras name, or the explicit "key=value,..." form with
                ``@pattern=`` overrides), a Lightning Fabric int (16, 32 or 64), a dict as
                `to_dict` writes it, or a Policy (returned as is).

        Returns:
            The validated Policy.

        Raises:
            PolicyError: ``value`` is no policy; the message names the offending token and
                the nearest valid spelling.
        """
        from .grammar import parse_policy

        return parse_policy(value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build a Policy from the dict `to_dict` writes.

        Args:
            data: The policy's fields (``param_dtype``, ``loss_scale``, ...; components as
                nested dicts or strings) and optionally ``schema_version``.

        Returns:
            The validated Policy.

        Raises:
            PolicyError: An unknown key, a bad value, or a ``schema_version`` newer than
                this dualprec reads.
        """
        from .serialize import policy_from_dict

        return policy_from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """Build a Policy from the JSON `to_json` writes.

        Args:
            text: A JSON object holding a policy dict.

        Returns:
            The validated Policy.

        Raises:
            PolicyError: The text is not valid JSON, gives a key twice, or holds no valid policy.
        """
        from .serialize import policy_from_json

        return policy_from_json(text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy from a file; nothing in the file is executed.

        Args:
            path: A ``.json`` or ``.toml`` file holding a policy dict, a ``{"policy":
                "<string>"}`` table, or a pyproject.toml with a ``[tool.dualprec]`` table.

        Returns:
            The validated Policy.

        Raises:
            PolicyError: The file is missing, has another suffix, does not parse, or holds
                no valid policy.
        """
        from .serialize import load_policy

        return load_policy(path)

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data (`from_dict` reads it back to an equal Policy).

        Returns:
            A JSON-ready dict with ``schema_version``, the four dtypes, ``loss_scale``,
            ``quantization``, ``fp8``, ``master_weights``, ``nonfinite`` and ``overrides``.
        """
        from .serialize import policy_to_dict

        return policy_to_dict(self)

    def to_json(self, **kwargs: Any) -> str:
        """The policy as JSON (`from_json` reads it back to an equal Policy).

        Args:
            **kwargs: Passed to `json.dumps`; ``indent`` defaults to 2.

        Returns:
            The JSON text of `to_dict`.
        """
        from .serialize import policy_to_json

        return policy_to_json(self, **kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the policy to a file that `load` reads back.

        Args:
            path: The file to write; its suffix picks the format, ``.json`` or ``.toml``.

        Raises:
            PolicyError: ``path`` has another suffix.
        """
        from .serialize import save_policy

        save_policy(self, path)

    def __str__(self) -> str:
        from .grammar import format_policy

        return format_policy(self)

    @property
    def name(self) -> str:
        """The canonical string (a preset name where one matches); `parse` reads it back."""
        return str(self)

    # ----- exports to other dialects --------------------------------------------------
    def to_jmp(self, *, ignore: tuple[str, ...] = ()) -> str:
        """The policy as a ``jmp.get_policy`` string, e.g. "p=f32,c=bf16,o=f32".

        Args:
            ignore: Fields to drop knowingly (``"loss_scale"``, ``"reduce_dtype"``, ...):
                jmp keeps loss scaling in a separate object and has no reduce dtype,
                quantization, FP8, master weights or overrides.

        Returns:
            The jmp policy string.

        Raises:
            PolicyError: The policy sets a field jmp cannot express and ``ignore`` does not
                name it; the message names the field.
        """
        from .dialects import to_jmp_string

        return to_jmp_string(self, ignore=ignore)

    def to_keras(self, *, ignore: tuple[str, ...] = ()) -> str:
        """The policy as a Keras 3 dtype policy name ("mixed_bfloat16", "int8_from_float32", ...).

        Args:
            ignore: Fields to drop knowingly (``"output_dtype"``, ``"loss_scale"``, ...).

        Returns:
            The Keras dtype policy name.

        Raises:
            PolicyError: The policy sets a field Keras cannot express and ``ignore`` does
                not name it, or its params/compute pair has no Keras policy.
        """
        from .dialects import to_keras_name

        return to_keras_name(self, ignore=ignore)

    def to_fabric(self, *, ignore: tuple[str, ...] = ()) -> str:
        """The policy as Lightning Fabric's ``precision=`` string ("bf16-mixed", "nf4-dq", ...).

        Args:
            ignore: Fields to drop knowingly before the lookup (``"loss_scale"``, ...).

        Returns:
            The Fabric precision string; a bitsandbytes mode comes back as the mode name,
            which Fabric takes as ``BitsandbytesPrecision(mode=...)``.

        Raises:
            PolicyError: No Fabric precision equals the policy.
        """
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
        """Every policy some module may run under.

        Returns:
            ``("", the top-level policy without overrides)`` first, then one ``(pattern,
            policy)`` pair per override, in order.
        """
        return (("", _replace(self, overrides=())),) + self.overrides

    @property
    def uses_quantization(self) -> bool:
        """Some module of the policy (the top level or an override) is quantized."""
        return any(q.quantization is not None for _, q in self.policies())

    @property
    def uses_fp8(self) -> bool:
        """Some module of the policy (the top level or an override) runs an FP8 recipe."""
        return any(q.fp8 is not None for _, q in self.policies())

    @property
    def fp8_recipe(self) -> FP8Recipe | None:
        """The FP8 recipe the policy's FP8 layers run: the top level's, else the first
        override's that has one (None without FP8).  Per module: ``for_module(path).fp8``."""
        return next((q.fp8 for _, q in self.policies() if q.fp8 is not None), None)

    @property
    def uses_mixed(self) -> bool:
        """Some module of the policy runs under the op table (a mixed policy)."""
        return any(q.is_mixed for _, q in self.policies())

    @property
    def needs_x64(self) -> bool:
        """Some module of the policy uses float64 (JAX needs ``jax_enable_x64``)."""
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
        """The policy of one module: the first override whose pattern matches, else the top level.

        Args:
            path: The module's dotted path, e.g. "blocks.0.attn" ("" for the root). A
                pattern matches a module and everything inside it.

        Returns:
            The override's policy, or the top-level policy without its overrides.
        """
        for pattern, sub in self.overrides:
            if _path_matches(path, pattern):
                return sub
        return self if not self.overrides else _replace(self, overrides=())

    def unmatched_overrides(self, module_paths: Iterable[str]) -> list[str]:
        """The override patterns that match no module.

        Args:
            module_paths: The model's dotted module paths (empty strings are ignored).

        Returns:
            The patterns, in override order, that match none of ``module_paths``.
        """
        paths = [p for p in module_paths if p]
        return [pat for pat, _ in self.overrides if not any(_path_matches(p, pat) for p in paths)]

    def check_overrides_match(self, module_paths: Iterable[str], where: str = "setup") -> None:
        """Refuse override and ``quant`` skip patterns that match no module of the model: a
        typo in one would otherwise leave that module under the wrong policy.

        Args:
            module_paths: The model's dotted module paths.
            where: The caller named at the start of the error message.

        Raises:
            PolicyError: Naming each pattern that matches nothing and the closest module paths.
        """
        paths = sorted({p for p in module_paths if p})
        self.check_skips_match(paths, where)
        bad = self.unmatched_overrides(paths)
        if not bad:
            return
        lines = _nearest_paths(bad, paths, prefix="@")
        raise PolicyError(f"{where}: override pattern{'s' if len(bad) > 1 else ''} {'; '.join(lines)} "
                          f"match{'es' if len(bad) == 1 else ''} no module of this model; fix the pattern "
                          "(dotted module paths, fnmatch wildcards)")

    def check_skips_match(self, module_paths: Iterable[str], where: str = "setup") -> None:
        """Refuse ``quant=...(skip=...)`` patterns that match no module: such a pattern
        quantizes the layer it meant to keep.

        Args:
            module_paths: The model's dotted module paths.
            where: The caller named at the start of the error message.

        Raises:
            PolicyError: Naming each skip pattern that matches nothing and the closest module paths.
        """
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
        """Whether the module at ``path`` has its weights quantized.

        Args:
            path: The module's dotted path.

        Returns:
            True when the module's policy (`for_module`) quantizes and no ``skip`` pattern
            keeps this module out.
        """
        q = self.for_module(path).quantization
        return q is not None and not q.skips(path)

    def replace(self, **changes: Any) -> Policy:
        """A copy with some fields changed, validated like a new Policy.

        Args:
            **changes: Field name to new value, in any form the constructor accepts.

        Returns:
            The new Policy.

        Raises:
            PolicyError: The changed policy is invalid.
        """
        return _replace(self, **changes)

    def check(self, caps: DeviceCaps) -> CheckReport:
        """Whether a device can run this policy, and what to run instead (see `check_policy`).

        Args:
            caps: The device's capabilities (``dualprec_torch.device_caps()`` or
                ``dualprec_jax.device_caps()`` build them).

        Returns:
            The CheckReport: ``ok``, the problems, the notes and the nearest runnable fallback.

        Raises:
            PolicyError: ``caps`` is not a DeviceCaps.
        """
        from .capabilities import check_policy

        return check_policy(self, caps)


def _nonfinite(value: Any, loss_scale: LossScaleConfig) -> str | None:
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


def _coerce(value: Any, cls: type[LossScaleConfig] | type[Quantization] | type[FP8Recipe], what: str) -> Any:
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


def _nearest_paths(patterns: Iterable[str], paths: list[str], prefix: str = "") -> list[str]:
    """'"pattern" (closest module paths: a, b, c)' for each pattern that matched nothing."""
    from .errors import closest

    out = []
    for pat in patterns:
        near = closest(pat, paths, n=3, cutoff=0.4) or paths[:3]
        out.append(f'"{prefix}{pat}" (closest module paths: '
                   f'{", ".join(near) if near else "the model has no submodules"})')
    return out


#: renamed: the configuration is ``LossScaleConfig`` (the state is a backend's ``LossScaleState``)
__getattr__ = alias_getattr(__name__, globals(), {"LossScale": "LossScaleConfig"})
