"""The mixed-precision op policy in torch: torch's CUDA autocast table, on every device.

On CUDA a mixed policy's compute context is plain ``torch.autocast``: nothing is added per
op, so a training loop through `Precision` is the hand-written autocast loop.

On CPU, ``torch.autocast("cpu")`` has its own lists, which differ from CUDA's: it leaves
exp, pow, rsqrt, softmax, layer_norm, sum, cumsum, ... in bfloat16/float16, and it runs some
ops CUDA leaves alone (reflection/replication padding, 3-D pooling, linear algebra, fft) in
float32.  So that a CPU run predicts a GPU's dtypes, the backend registers kernels for the
``AutocastCPU`` dispatch key of the aten ops, once, the first time a mixed policy's context is
entered on CPU:

- for every aten op of the CUDA table (`dualprec.optable`) that CPU autocast does not
  already treat the CUDA way: cast the operands as CUDA autocast does, then call the op
  below autocast (an exclude guard for the key, as torch's own kernels do);
- for the ops CPU autocast lists and CUDA does not: redispatch unchanged.

The kernels are C++ (``_ops_kernels.cpp``, compiled against the installed torch on first use
with ``torch.utils.cpp_extension``, registered from C++; unboxed through torch's own autocast
wrapper for the common float32-list ops, one boxed kernel for the rest).  Where the build is
not possible the same rules run as Python kernels (``torch.library``), with a warning; see
`KERNELS_ENV`.  No torch function and no module attribute is replaced.

Each kernel applies the CUDA rule while a `Precision` context is active in this thread, and
in the autocast regions torch re-enters during the backward of a Precision forward
(checkpoint recomputation, ``custom_bwd``; see `_cuda_rule`); otherwise, under a plain
``torch.autocast("cpu")``, it does what torch's CPU autocast does for that op (nothing for ops
CPU autocast does not list, its own cast for the ones it does), so installing the table
changes nothing for code that does not use dualprec.  Ops on no list have no kernel and cost
nothing; gradients flow through the casts as through torch's.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import warnings
import weakref
from pathlib import Path

import torch

from dualprec import optable

from .casts import torch_dtype

__all__ = ["OP_TABLE", "FP32_OPS", "compute_context", "backward_context", "cpu_table", "install_cpu_table",
           "uninstall_cpu_table", "cpu_table_installed", "cpu_kernels", "kernel_language", "KERNELS_ENV"]

#: The op table the torch backend applies (torch's CUDA autocast lists).
OP_TABLE = optable.ENTRIES

#: The torch callables the op table runs in float32 under a mixed policy (its "fp32" list),
#: by the name users call them with.  mean, var, std, batch_norm and gelu are not here:
#: CUDA autocast leaves them in the compute dtype.
FP32_OPS = tuple(dict.fromkeys(name for e in optable.FP32 for name in e.torch))

_KEY = "AutocastCPU"
_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_AFTER = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.AutocastCPU)
_f32, _f64 = torch.float32, torch.float64

# AutocastCPU kernels torch has for ops CUDA's table also lists, whose CPU rule differs from
# CUDA's: aten name -> CPU autocast's own rule (what the kernel does outside Precision).
_CPU_DIFFERS = {"binary_cross_entropy": "fp32", "grid_sampler": "fp32", "prod": "fp32", "prod.dim_int": "fp32"}
# AutocastCPU kernels torch has for ops on no CUDA list that we leave in place: conv*.padding
# reach CUDA's convolution kernel;
# cross_entropy_loss reaches log_softmax + nll_loss, float32 on CUDA too; mkldnn_rnn_layer is
# CPU's twin of CUDA's _cudnn_rnn; the fast paths below never run under autocast in training.
_CPU_KEEP = frozenset({"conv1d.padding", "conv2d.padding", "conv3d.padding", "cross_entropy_loss",
                       "mkldnn_rnn_layer", "_addmm_activation", "_native_multi_head_attention"})
# CPU autocast's rule for the other CPU-only ops it lists (float32 unless named here).  cat and
# stack: CPU autocast promotes them from the compute dtype (and refuses float16 operands under
# bfloat16); CUDA has no kernel for them, so native type promotion decides there.
_CPU_ONLY_RULE = {"index_copy": "promote", "cat": "promote", "stack": "promote"}

_BANNED_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast.  (dualprec applies CUDA autocast's table on CPU too.)")


class _State(threading.local):
    depth = 0         # Precision contexts entered in this thread
    backward = False  # inside Precision.backward
    replay = False    # the last CPU-autocast forward of this thread ran under Precision
    cache = None      # the cast cache of the outermost Precision context: id -> (weakref, cast)


_STATE = _State()
_installed: dict = {}  # "lib" (Python kernels) or "native" (C++), "kernels" -> {aten name: (active, inactive)}, "language"


def _cuda_rule() -> bool:
    """Whether a kernel called now applies CUDA's rule (else CPU autocast's own).

    Inside a Precision context: yes.  Outside one, autocast is on only where torch re-enters it
    itself: a plain ``torch.autocast("cpu")`` block, or, during a backward pass, the recomputation
    of a checkpointed region (``torch.utils.checkpoint``, reentrant or not) and a
    ``torch.amp.custom_bwd`` backward, which restore the forward's autocast state.  Those get
    CUDA's rule when the forward ran under Precision: during `Precision.backward`, and during any
    other backward pass (``loss.backward()``, ``torch.autograd.grad``) when the last autocast
    forward of this thread that ran a listed op ran under Precision.  A listed op under a plain
    ``torch.autocast("cpu")`` outside a backward pass turns that back to CPU autocast's rules.
    """
    if _STATE.depth or _STATE.backward:
        return True
    if not _STATE.replay:
        return False
    if torch._C._current_graph_task_id() != -1:
        return True
    _STATE.replay = False  # a plain torch.autocast forward: CPU autocast's rules from here on
    return False


# ----- the casts, as torch's autocast kernels do them ------------------------------------
def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not _f64 and t.device.type == "cpu"


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        if x.dtype is not dtype and x.is_floating_point() and x.dtype is not _f64 and x.device.type == "cpu":
            return x.to(dtype)
        return x
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (torch.Tensor, type(None))):
        return type(x)(_cast(t, dtype) for t in x)
    return x


def _cast_cached(x, dtype):
    """`_cast` to the compute dtype, with torch's cast cache: inside one outermost Precision
    context a float32 leaf that requires grad (a weight) is cast once per dtype, and every later
    use reuses that tensor, as torch's autocast kernels do (``torch.is_autocast_cache_enabled()``;
    the cache is dropped when the outermost context exits)."""
    if isinstance(x, torch.Tensor):
        cache = _STATE.cache
        if (cache is None or x.dtype is not _f32 or not x.requires_grad or not x.is_leaf or x._is_view()
                or x.device.type != "cpu" or not torch.is_autocast_cache_enabled()
                or torch.is_inference_mode_enabled()):  # as torch: inference tensors are not reused
            return _cast(x, dtype)
        hit = cache.get((id(x), dtype))
        if hit is not None and hit[0]() is x:
            return hit[1]
        out = x.to(dtype)
        cache[id(x), dtype] = (weakref.ref(x), out)
        return out
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (torch.Tensor, type(None))):
        return type(x)(_cast_cached(t, dtype) for t in x)
    return x


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _widest(args, kwargs):
    lower = torch.get_autocast_dtype("cpu")
    current = lower
    for t in _tensors(args, kwargs):
        if not _eligible(t):
            continue
        if t.dtype is _f32 or current is _f32:
            current = _f32
        elif t.dtype is not lower:
            raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
    return current


def _cast_back(out, dtype):
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() and out.dtype is _f32 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_cast_back(o, dtype) for o in out)
    return out


def _make_kernel(name: str, op, rule: str, outside=None):
    """The kernel body of one cast rule for one aten overload: ``kernel(keyset, *args, **kwargs)``;
    with ``outside`` (another kernel), that one runs instead when no Precision context is
    active in this thread.

    The cast rules exclude the autocast key while the op runs (the ops it calls are not
    autocast again), as torch's own autocast kernels do.  "passthrough" redispatches below
    this kernel only, so an op that decomposes into listed ops has those autocast, as when
    autocast has no kernel for it.  "unlisted" is "passthrough" for ops CPU autocast lists and
    CUDA does not; where the CPU kernel has no half-precision implementation (CPU autocast
    upcasts them for that reason) it computes in float32 and returns the input dtype.
    """
    call = op._op  # the C++ op itself: one Python frame less than OpOverload.__call__
    if rule in ("passthrough", "unlisted"):
        upcast = _make_kernel(name, op, "fp32") if rule == "unlisted" else None
        op_redispatch = op.redispatch

        def kernel(keyset, *args, **kwargs):
            if outside is not None and not _cuda_rule():
                return outside(keyset, *args, **kwargs)
            try:
                return op_redispatch(keyset & _AFTER, *args, **kwargs)
            except RuntimeError as err:
                if upcast is None or "not implemented for" not in str(err):
                    raise
                half = [t.dtype for t in _tensors(args, kwargs) if _eligible(t) and t.dtype is not _f32]
                if not half:
                    raise
                return _cast_back(upcast(keyset, *args, **kwargs), half[0])
    elif rule in ("lower_precision_fp", "fp32"):
        fixed = _f32 if rule == "fp32" else None
        cast = _cast if fixed else _cast_cached  # torch caches only the casts down to the compute dtype

        def kernel(keyset, *args, **kwargs):
            if outside is not None and not _cuda_rule():
                return outside(keyset, *args, **kwargs)
            dtype = fixed or torch.get_autocast_dtype("cpu")
            with torch._C._ExcludeDispatchKeyGuard(_KEYSET):
                return call(*[cast(a, dtype) for a in args], **{k: cast(v, dtype) for k, v in kwargs.items()})
    elif rule == "fp32_set_opt_dtype":
        arg = next(a for a in op._schema.arguments if a.name == "dtype")
        pos = None if arg.kwarg_only else [a.name for a in op._schema.arguments].index("dtype")

        def kernel(keyset, *args, **kwargs):
            if outside is not None and not _cuda_rule():
                return outside(keyset, *args, **kwargs)
            with torch._C._ExcludeDispatchKeyGuard(_KEYSET):
                if not _eligible(args[0]):
                    return call(*args, **kwargs)
                if pos is not None and len(args) > pos:
                    if args[pos] is None:
                        args = (*args[:pos], _f32, *args[pos + 1:])
                elif kwargs.get("dtype") is None:
                    kwargs["dtype"] = _f32
                return call(*args, **kwargs)
    elif rule == "fp32_append_dtype":
        with_dtype = {"norm.Scalar": torch.ops.aten.norm.ScalarOpt_dtype,
                      "norm.ScalarOpt_dim": torch.ops.aten.norm.ScalarOpt_dim_dtype}[name]
        names = [a.name for a in op._schema.arguments]
        defaults = [a.default_value if a.has_default_value() else None for a in op._schema.arguments]

        def kernel(keyset, *args, **kwargs):
            if outside is not None and not _cuda_rule():
                return outside(keyset, *args, **kwargs)
            with torch._C._ExcludeDispatchKeyGuard(_KEYSET):
                if not _eligible(args[0]):
                    return call(*args, **kwargs)
                full = [args[i] if i < len(args) else kwargs.get(n, defaults[i]) for i, n in enumerate(names)]
                return with_dtype(*full, dtype=_f32)
    elif rule == "promote":
        def kernel(keyset, *args, **kwargs):
            if outside is not None and not _cuda_rule():
                return outside(keyset, *args, **kwargs)
            dtype = _widest(args, kwargs)
            with torch._C._ExcludeDispatchKeyGuard(_KEYSET):
                return call(*[_cast(a, dtype) for a in args], **{k: _cast(v, dtype) for k, v in kwargs.items()})
    elif rule == "banned":
        def kernel(keyset, *args, **kwargs):
            if outside is not None and not _cuda_rule():
                return outside(keyset, *args, **kwargs)
            raise RuntimeError(_BANNED_MESSAGE)
    else:
        raise ValueError(f"unknown cast rule {rule!r}")
    return kernel


def _overload(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", _KEY)


def _plan() -> dict[str, tuple[str, str]]:
    """aten name -> (rule inside Precision, rule outside it), for every op that gets a kernel."""
    plan = {}
    known = set(torch._C._dispatch_get_all_op_names())
    for e in optable.ENTRIES + optable.BANNED:
        for name in e.aten:
            if name in optable.CUDA_BUILD_ONLY or f"aten::{name}" not in known:
                continue
            if not _has_cpu_kernel(name):
                plan[name] = (optable.torch_cast_policy(name), "passthrough")
            elif name in _CPU_DIFFERS:
                plan[name] = (optable.torch_cast_policy(name), _CPU_DIFFERS[name])
    table = {a for e in optable.ENTRIES + optable.BANNED for a in e.aten}
    for q in sorted(known):
        name = q.removeprefix("aten::")
        if (q.startswith("aten::") and name not in table and name not in _CPU_KEEP
                and _has_cpu_kernel(name)):
            plan[name] = ("unlisted", _CPU_ONLY_RULE.get(name, "fp32"))
    return plan


# ----- the C++ kernels (the default) ---------------------------------------------------------
#: Environment variable choosing the kernels: "c++" (build them or fail), "python" (the Python
#: kernels above, no compiler needed); unset: C++, or Python with a warning if the build fails.
KERNELS_ENV = "DUALPREC_TORCH_OPS_KERNELS"

_RULE_CODES = {"passthrough": 0, "unlisted": 1, "lower_precision_fp": 2, "fp32": 3, "fp32_set_opt_dtype": 4,
               "fp32_append_dtype": 5, "promote": 6, "banned": 7}  # enum Rule in _ops_kernels.cpp
_native: dict = {}  # "lib" -> the loaded ctypes.CDLL; "error" -> why it could not be built


def _build_native() -> ctypes.CDLL:
    """Compile ``_ops_kernels.cpp`` against the installed torch (once; torch caches the build
    under ``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions) and load it."""
    from torch.utils import cpp_extension

    name = "dualprec_ops_" + re.sub(r"\W", "_", torch.__version__)  # one build per torch version
    path = cpp_extension.load(name=name, sources=[str(Path(__file__).with_name("_ops_kernels.cpp"))],
                              extra_cflags=["-O2"], is_python_module=False, verbose=False)
    lib = ctypes.CDLL(path)
    for fn, res, args in (("enter", None, []), ("exit", None, []), ("set_backward", ctypes.c_int, [ctypes.c_int]),
                          ("cuda_rule", ctypes.c_int, []), ("depth", ctypes.c_int, []),
                          ("error", ctypes.c_char_p, []),
                          ("register", ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
                          ("has_fast", ctypes.c_int, [ctypes.c_char_p]),
                          ("unregister_all", None, [])):
        f = getattr(lib, f"dualprec_optable_{fn}")
        f.restype, f.argtypes = res, args
    return lib


def _native_lib(choice: str | None = None):
    """The loaded C++ kernels, or None where the Python kernels are used.  ``choice``: "c++"
    (build or raise), "python", or None for `KERNELS_ENV` (unset: C++, else Python with a warning)."""
    forced = choice is not None
    choice = (choice if forced else os.environ.get(KERNELS_ENV, "")).strip().lower()
    if choice not in ("", "c++", "cpp", "python"):
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected 'c++' or 'python' (or unset for C++ with a "
                         "Python fallback)")
    if choice == "python":
        return None
    if "lib" in _native or ("error" in _native and not choice):
        return _native.get("lib")
    try:
        _native["lib"] = _build_native()
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, headers missing: said below
        if choice:
            where = "" if forced else f"{KERNELS_ENV}={choice}: "
            raise RuntimeError(f"{where}building dualprec_torch's C++ op-table kernels failed "
                               f"({type(err).__name__}: {err}); install a C++ compiler and ninja, or set "
                               f"{KERNELS_ENV}=python") from err
        _native["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        warnings.warn(f"dualprec_torch: could not build the C++ op-table kernels ({_native['error']}); using the "
                      "Python kernels, a few microseconds more per listed op on CPU. Install a C++ compiler and "
                      f"ninja, or set {KERNELS_ENV}=python to choose the Python kernels and silence this.",
                      RuntimeWarning, stacklevel=4)
    return _native.get("lib")


def kernel_language() -> str | None:
    """Which kernels apply the table on CPU: "c++", "python", or None before the first install."""
    return _installed.get("language")


def install_cpu_table(language: str | None = None, *, fast: bool = True) -> None:
    """Register the CPU emulation of the CUDA table (idempotent; `compute_context` calls it):
    the C++ kernels where they build (see `KERNELS_ENV`), else the Python ones.  ``language``
    ("c++" or "python") replaces kernels of the other language already registered.  ``fast``
    (C++ only): the unboxed kernels for the common float32-list ops (exp, pow, sum, softmax,
    layer_norm, ...); False registers the generic boxed kernel for every op (a test compares them)."""
    if language is not None and language.lower() not in ("c++", "cpp", "python"):
        raise ValueError(f"language={language!r}: expected 'c++' or 'python'")
    if _installed:
        if language is None or (_installed["language"] == ("python" if language == "python" else "c++")
                                 and _installed.get("fast", True) == fast):
            return
        uninstall_cpu_table()
    plan = _plan()
    native = _native_lib(language)
    kernels = {}
    if native is not None:
        for name, (active_rule, inactive_rule) in plan.items():
            if native.dualprec_optable_register(name.encode(), _RULE_CODES[active_rule], _RULE_CODES[inactive_rule],
                                                int(fast)):
                native.dualprec_optable_unregister_all()
                raise RuntimeError(f"registering the AutocastCPU kernel of aten::{name} failed: "
                                   f"{native.dualprec_optable_error().decode()}")
            kernels[name] = (active_rule, inactive_rule)
        _installed.update(native=native, kernels=kernels, language="c++", fast=fast)
        return
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
        for name, (active_rule, inactive_rule) in plan.items():
            op = _overload(name)
            kernel = _make_kernel(name, op, active_rule, outside=_make_kernel(name, op, inactive_rule))
            lib.impl(name, kernel, _KEY, with_keyset=True)
            kernels[name] = (active_rule, inactive_rule)
    _installed.update(lib=lib, kernels=kernels, language="python")


def uninstall_cpu_table() -> None:
    """Drop the registered kernels (torch's own AutocastCPU kernels come back)."""
    lib, native = _installed.pop("lib", None), _installed.pop("native", None)
    _installed.clear()
    if lib is not None:
        lib._destroy()
    if native is not None:
        native.dualprec_optable_unregister_all()


def cpu_table_installed() -> bool:
    return bool(_installed)


def cpu_kernels() -> dict[str, tuple[str, str]]:
    """aten name -> (rule inside Precision, rule outside it) of the registered kernels."""
    return dict(_installed.get("kernels", {}))


# ----- the contexts (plain classes: entered once or more per training step) ---------------
def _table_enter():
    install_cpu_table()
    native = _native.get("lib")  # its thread state is kept with the Python one (either may run)
    if not _STATE.depth:
        _STATE.cache = {}
    _STATE.depth += 1
    _STATE.replay = True  # see _cuda_rule: a backward of this forward replays under CUDA's rule
    if native is not None:
        native.dualprec_optable_enter()
    return native


def _table_exit(native) -> None:
    if native is not None:
        native.dualprec_optable_exit()
    _STATE.depth -= 1
    if not _STATE.depth:
        _STATE.cache = None


class cpu_table:
    """CUDA's table for ``torch.autocast("cpu")`` inside this context (this thread)."""

    def __enter__(self):
        self._native = _table_enter()

    def __exit__(self, *exc) -> bool:
        _table_exit(self._native)
        return False


class backward_context:
    """Context for a backward pass of a forward run under Precision: autocast regions torch
    re-enters in it (checkpoint recomputation, ``custom_bwd``) get CUDA's table on CPU."""

    def __enter__(self):
        self._previous, _STATE.backward = _STATE.backward, True
        self._native = native = _native.get("lib")
        self._native_previous = native.dualprec_optable_set_backward(1) if native is not None else 0

    def __exit__(self, *exc) -> bool:
        if self._native is not None:
            self._native.dualprec_optable_set_backward(self._native_previous)
        _STATE.backward = self._previous
        return False


class compute_context:
    """The context a policy's forward (and loss) runs in.

    Mixed (params wider than compute): ``torch.autocast`` to the compute dtype; on CPU with
    CUDA's op table (`cpu_table`).  Otherwise ("-true"): no autocast (turned off when
    ``nested`` inside a mixed parent, for a per-module override) and, as Fabric does, the
    compute dtype as torch's default dtype so tensors created in forward get it.
    """

    def __init__(self, policy, device_type: str, *, nested: bool = False):
        self._policy, self._device_type, self._nested = policy, device_type, nested
        self._exits: list = []

    def __enter__(self):
        policy, exits = self._policy, self._exits
        compute = torch_dtype(policy.compute_dtype)
        try:
            if policy.is_mixed:
                autocast = torch.autocast(self._device_type, dtype=compute)
                autocast.__enter__()
                exits.append(autocast.__exit__)
                if self._device_type == "cpu":
                    native = _table_enter()
                    exits.append(lambda *exc: _table_exit(native))
            else:
                if self._nested:
                    off = torch.autocast(self._device_type, enabled=False)
                    off.__enter__()
                    exits.append(off.__exit__)
                if compute != torch.get_default_dtype():
                    previous = torch.get_default_dtype()
                    torch.set_default_dtype(compute)
                    exits.append(lambda *exc: torch.set_default_dtype(previous))
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> bool:
        exits = self._exits
        while exits:
            exits.pop()(*exc)
        return False
