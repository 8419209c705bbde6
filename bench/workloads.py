"""The named benchmark workloads and the policies they run under, in both backends.

The workload is the H200 reference 4-block MLP (LayerNorm -> Linear(d, h) -> GELU -> Linear(h, d),
residual) trained with AdamW on loss = mean(y^2), at GPU size (537M parameters, 16384
tokens) and at sizes that run on a 2-core CPU.  Each policy has a hand-written baseline per
backend (torch.autocast + GradScaler; Flax dtype/param_dtype + jmp) and, where dualprec
implements it, a dualprec twin (the FP8 row's twin is dualprec's native FP8 engine in both
backends); the nf4 row times the hand-written baseline only and records the dualprec side as
"not implemented" in this workload (the library's nf4 layers are timed by
bench/bench_quant_memory.py and bench/gpu_run.py).

A *case* is one (backend, policy, impl) built on a device: it owns its model, optimizer
state and batch, and exposes `step()` for timing and the tensors `bench.memory` counts.
Torch and JAX are imported inside the builders, so `python -m bench list` needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MLPConfig", "WORKLOADS", "PolicyRow", "POLICIES", "policy_row", "dualprec_status",
    "build_torch_case", "build_jax_case", "torch_gemm", "jax_gemm", "torch_nf4_gemv", "jax_nf4_gemv",
    "NOT_IMPLEMENTED_NF4",
]


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class MLPConfig:
    name: str
    d_model: int
    d_hidden: int
    n_blocks: int
    tokens: int

    @property
    def linear_params(self) -> int:
        return self.n_blocks * 2 * self.d_model * self.d_hidden

    @property
    def params(self) -> int:
        """Every parameter: both Linears with biases and the LayerNorm scale and shift."""
        per_block = 2 * self.d_model * self.d_hidden + self.d_hidden + self.d_model + 2 * self.d_model
        return self.n_blocks * per_block

    def train_flops(self) -> float:
        """6 x params x tokens: the convention of the H200 reference figures."""
        return 6.0 * self.params * self.tokens

    def frozen_train_flops(self) -> float:
        """Forward plus input gradients only (2 + 2) x linear params x tokens: a step through
        frozen quantized weights computes no weight gradients."""
        return 4.0 * self.linear_params * self.tokens


WORKLOADS = {
    # the H200 reference workload (537M parameters)
    "mlp-gpu": MLPConfig("mlp-gpu", 4096, 16384, 4, 16384),
    # about 2M parameters: a training step takes ~0.1 s on 2 CPU cores
    "mlp-cpu": MLPConfig("mlp-cpu", 256, 1024, 4, 512),
    # checks plumbing only (gpu_run.py --smoke, tests)
    "mlp-smoke": MLPConfig("mlp-smoke", 64, 128, 2, 64),
}


# --------------------------------------------------------------------------- policies

NOT_IMPLEMENTED_NF4 = ("not implemented in this workload: no dualprec nf4 twin of the frozen-base training step yet; "
                       "dualprec's nf4 layers are timed in bench/bench_quant_memory.py (CPU) and "
                       "bench/gpu_run.py rows d1/d2; the hand-written baseline is measured")


@dataclass(frozen=True)
class PolicyRow:
    label: str             # the row name in tables and plots
    spec: str              # a string dualprec.Policy.parse accepts
    not_implemented: str | None = None  # why dualprec has no row for it yet

    def canonical(self) -> str:
        from dualprec import Policy
        return str(Policy.parse(self.spec))


POLICIES = (
    PolicyRow("32-true", "32-true"),
    PolicyRow("bf16-mixed", "bf16-mixed"),
    PolicyRow("16-mixed", "16-mixed"),
    PolicyRow("bf16-true", "bf16-true"),
    PolicyRow("fp8-current", "params=float32,compute=bfloat16,output=float32,fp8=current"),
    PolicyRow("nf4", "nf4", NOT_IMPLEMENTED_NF4),
)


def policy_row(label: str) -> PolicyRow:
    for row in POLICIES:
        if row.label == label:
            return row
    raise KeyError(f"unknown policy row {label!r}; rows are {', '.join(r.label for r in POLICIES)}")


def dualprec_status(backend: str, label: str) -> str | None:
    """None when dualprec can run `label` in `backend`; otherwise the reason it cannot."""
    row = policy_row(label)
    if row.not_implemented:
        return row.not_implemented
    module = {"torch": "dualprec_torch", "jax": "dualprec_jax"}[backend]
    try:
        mod = __import__(module)
    except ImportError as e:
        return f"{module} cannot be imported ({e})"
    if not hasattr(mod, "Precision"):
        return f"{module}.Precision is not implemented yet"
    return None


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A built benchmark subject: `step()` runs one training step (returns something `sync`
    can wait on), `weights/grads/optimizer_state()` give what `bench.memory` counts."""

    backend: str
    policy: str
    impl: str
    flops_per_step: float
    step: Callable[[], Any]
    sync: Callable[[Any], Any]
    forward_backward: Callable[[], Any] | None = None
    weights: Callable[[], list] = lambda: []
    grads: Callable[[], list] = lambda: []
    optimizer_state: Callable[[], list] = lambda: []
    peak_memory: Callable[[], int | None] = lambda: None
    extra: dict = field(default_factory=dict)


# ---- torch -------------------------------------------------------------------------------

E4M3_MAX = 448.0
E5M2_MAX = 57344.0


def _torch_mlp(cfg: MLPConfig, linear: Callable[[int, int], Any] | None = None):
    import torch
    from torch import nn

    linear = linear or nn.Linear

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(cfg.d_model)
            self.fc1 = linear(cfg.d_model, cfg.d_hidden)
            self.fc2 = linear(cfg.d_hidden, cfg.d_model)

        def forward(self, x):
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))

    return nn.Sequential(*[Block() for _ in range(cfg.n_blocks)]).to(torch.get_default_dtype())


def _torch_fp8_linear_cls():
    """The library's FP8 linear (`dualprec_torch.fp8.FP8Linear`): its three GEMMs run in FP8
    through `torch._scaled_mm` with current (per-tensor, just-in-time) scaling, e4m3
    activations and weights, e5m2 gradients (HYBRID), fp32 master weights, bf16 outputs."""
    import functools

    import torch

    from dualprec import FP8Recipe
    from dualprec_torch.fp8 import FP8Linear

    return functools.partial(FP8Linear, recipe=FP8Recipe("current"), out_dtype=torch.bfloat16)


def _torch_device_helpers(device: str):
    import torch

    if device.startswith("cuda"):
        def sync(out):
            torch.cuda.synchronize()
            return out

        def peak_reset():
            torch.cuda.reset_peak_memory_stats()

        def peak_read():
            return int(torch.cuda.max_memory_allocated())
        return sync, peak_reset, peak_read
    return (lambda out: out), (lambda: None), (lambda: None)


def build_torch_case(cfg: MLPConfig, label: str, *, impl: str = "hand", device: str = "cpu",
                     compiled: bool = False, compile_backend: str | None = None, seed: int = 0) -> Case:
    """One torch training step of the MLP under policy row `label`, hand-written or
    through dualprec_torch.Precision."""
    import torch

    torch.manual_seed(seed)
    dev = torch.device(device)
    x = torch.randn(cfg.tokens, cfg.d_model, device=dev)
    flops = cfg.train_flops()
    scaler = None
    autocast_dtype = None
    extra: dict[str, Any] = {}

    if impl == "dualprec":
        return _torch_dualprec_case(cfg, label, x, dev, compiled, compile_backend)

    if label in ("32-true", "bf16-mixed", "16-mixed", "bf16-true"):
        with dev:
            model = _torch_mlp(cfg)
        if label == "bf16-true":
            model = model.to(torch.bfloat16)
            x = x.to(torch.bfloat16)
        autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(label)
        if label == "16-mixed":
            scaler = torch.amp.GradScaler(dev.type)
    elif label == "fp8-current":
        with dev:
            model = _torch_mlp(cfg, _torch_fp8_linear_cls())
        extra["recipe"] = "torch._scaled_mm, per-tensor current scaling, e4m3 fwd / e5m2 grad, fp32 master"
    elif label == "nf4":
        import bitsandbytes as bnb

        def nf4_linear(i, o):
            return bnb.nn.Linear4bit(i, o, compute_dtype=torch.bfloat16, quant_type="nf4")
        with dev:
            model = _torch_mlp(cfg, nf4_linear)
        # Params4bit quantizes on its first move to a device, so cast first: bf16 weights in,
        # nf4 codes out; LayerNorms and biases stay trainable in bf16 (QLoRA-style frozen base).
        model = model.to(dtype=torch.bfloat16).to(dev)
        x = x.to(torch.bfloat16)
        flops = cfg.frozen_train_flops()
        extra["recipe"] = "bitsandbytes Linear4bit nf4 (frozen), bf16 compute; trains LayerNorms and biases"
        extra["flops_formula"] = "4 x linear params x tokens (no weight gradients)"
    else:
        raise KeyError(label)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    run_model = model
    if compiled:
        run_model = torch.compile(model, backend=compile_backend or "inductor")
        extra["compile_backend"] = compile_backend or "inductor"

    def forward_backward():
        if autocast_dtype is not None:
            with torch.autocast(dev.type, dtype=autocast_dtype):
                y = run_model(x)
        else:
            y = run_model(x)
        loss = y.float().pow(2).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        return loss

    def step():
        loss = forward_backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync, peak_reset, peak_read = _torch_device_helpers(device)
    return Case("torch", label, "hand", flops, step, sync, forward_backward=forward_backward,
                weights=lambda: _torch_weight_tensors(model),
                grads=lambda: [p.grad for p in model.parameters() if p.grad is not None],
                optimizer_state=lambda: _torch_opt_tensors(opt),
                peak_memory=_peak_of(step, sync, peak_reset, peak_read), extra=extra)


def _peak_of(step, sync, reset, read):
    def peak():
        reset()
        sync(step())
        return read()
    return peak


def _torch_weight_tensors(model) -> list:
    out = []
    for m in model.modules():
        for p in m.parameters(recurse=False):
            out.append(p)
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:  # bitsandbytes keeps the absmax beside the packed codes
            out.append(state.absmax)
            if getattr(state, "state2", None) is not None:
                out.append(state.state2.absmax)
    return out


def _torch_opt_tensors(opt) -> list:
    import torch
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _torch_dualprec_case(cfg, label, x, dev, compiled, compile_backend) -> Case:
    import torch

    from dualprec_torch import Precision

    prec = Precision(policy_row(label).spec, device=dev)
    with dev, prec.init_module():
        model = _torch_mlp(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    setup = prec.setup(model, opt)
    if isinstance(setup, tuple):
        model, opt = setup[0], setup[1]
    elif setup is not None:
        model = setup
    run_model = torch.compile(model, backend=compile_backend or "inductor") if compiled else model
    x = prec.convert_input(x) if hasattr(prec, "convert_input") else x

    def forward_backward():
        with prec.autocast():
            y = run_model(x)
            loss = y.float().pow(2).mean()
        prec.backward(loss)
        return loss

    def step():
        loss = forward_backward()
        prec.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss

    sync, peak_reset, peak_read = _torch_device_helpers(str(dev))
    extra = {"compile_backend": compile_backend or "inductor"} if compiled else {}
    return Case("torch", label, "dualprec", cfg.train_flops(), step, sync, forward_backward=forward_backward,
                weights=lambda: _torch_weight_tensors(model),
                grads=lambda: [p.grad for p in model.parameters() if p.grad is not None],
                optimizer_state=lambda: _torch_opt_tensors(opt),
                peak_memory=_peak_of(step, sync, peak_reset, peak_read), extra=extra)


def torch_gemm(n: int, kind: str, device: str = "cpu", inner: int = 4) -> Case:
    """`inner` n^3 GEMMs per step (so per-step sync overhead stays small): bf16/fp16/fp32
    matmul or fp8 e4m3 `torch._scaled_mm`."""
    import torch

    dev = torch.device(device)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    if kind == "fp8-e4m3":
        a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)

        def step():
            for _ in range(inner):
                out = torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            return out
    else:
        from dualprec.dtypes import canonical_dtype
        from dualprec_torch.casts import torch_dtype

        dtype = torch_dtype(canonical_dtype(kind))
        a, b = a.to(dtype), b.to(dtype)

        def step():
            for _ in range(inner):
                out = a @ b
            return out
    sync, _, _ = _torch_device_helpers(device)
    return Case("torch", kind, "ceiling", 2.0 * n**3 * inner, step, sync)


def torch_nf4_gemv(d_in: int, d_out: int, device: str = "cpu", inner: int = 10) -> Case:
    """bitsandbytes nf4 Linear on one token (inference decode), `inner` calls per step."""
    import bitsandbytes as bnb
    import torch

    dev = torch.device(device)
    with dev:
        layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer = layer.to(dtype=torch.bfloat16).to(dev)
    x = torch.randn(1, d_in, device=dev, dtype=torch.bfloat16)

    @torch.no_grad()
    def step():
        for _ in range(inner):
            out = layer(x)
        return out
    sync, _, _ = _torch_device_helpers(device)
    return Case("torch", "nf4", "hand", 2.0 * d_in * d_out * inner, step, sync, extra={"calls_per_step": inner})


# ---- JAX ---------------------------------------------------------------------------------


def _jax_sync(out):
    import jax
    return jax.block_until_ready(out)


def _fp8_dot_general():
    """A Flax-compatible dot_general whose three GEMMs run on FP8 operands with current
    scaling (e4m3 forward, e5m2 gradients), accumulating in fp32: the library's
    (`dualprec_jax.fp8.current_dot_general`), bf16 operands and output as before."""
    import jax.numpy as jnp

    from dualprec_jax.fp8 import current_dot_general

    dot = current_dot_general("current")

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        return dot(lhs.astype(jnp.bfloat16), rhs, dimension_numbers).astype(jnp.bfloat16)

    return dot_general


def _nf4_tools():
    import jax.numpy as jnp
    import numpy as np

    from dualprec.ref.fourbit import CODEBOOKS

    code = np.asarray(CODEBOOKS["nf4"], np.float32)
    order = np.argsort(code)
    sorted_code = code[order]
    mids = jnp.asarray((sorted_code[1:] + sorted_code[:-1]) / 2)
    table = jnp.asarray(code)
    order_j = jnp.asarray(order.astype(np.uint8))

    def quantize(w, blocksize=64):
        """(out, in) float -> packed uint8 codes (two per byte, even element high) and fp32
        absmax per block of the flat row-major weight, as bitsandbytes lays them out."""
        flat = w.reshape(-1, blocksize).astype(jnp.float32)
        absmax = jnp.max(jnp.abs(flat), axis=1)
        scaled = flat / jnp.where(absmax > 0, absmax, 1.0)[:, None]
        codes = order_j[jnp.searchsorted(mids, scaled.reshape(-1))]
        packed = (codes[0::2] << 4) | codes[1::2]
        return packed.astype(jnp.uint8), absmax

    def dequantize(packed, absmax, shape, dtype, blocksize=64):
        codes = jnp.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)
        values = table[codes].reshape(-1, blocksize) * absmax[:, None]
        return values.reshape(shape).astype(dtype)

    return quantize, dequantize


def _flax_mlp(cfg: MLPConfig, *, dtype, param_dtype, norm_dtype, precision=None, dot_general=None, nf4=False):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    dense_kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision}
    if dot_general is not None:
        dense_kw["dot_general"] = dot_general
    quantize, dequantize = _nf4_tools() if nf4 else (None, None)

    class NF4Dense(nn.Module):
        """A frozen nf4 Linear: codes and absmax live in the "quant" collection (never
        trained), dequantized to bf16 right before the dot, like a plain-jit QLoRA base."""
        features: int

        @nn.compact
        def __call__(self, x):
            shape = (self.features, x.shape[-1])

            def init_codes():
                w = nn.initializers.lecun_normal()(self.make_rng("params"), shape, jnp.float32)
                return quantize(w)
            packed = self.variable("quant", "packed", lambda: init_codes()[0])
            absmax = self.variable("quant", "absmax", lambda: init_codes()[1])
            bias = self.param("bias", nn.initializers.zeros, (self.features,), param_dtype)
            w = dequantize(packed.value, absmax.value, shape, dtype)
            y = jax.lax.dot_general(x.astype(dtype), w, (((x.ndim - 1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            return (y + bias.astype(jnp.float32)).astype(dtype)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm(dtype=norm_dtype, param_dtype=param_dtype)(x)
            if nf4:
                y = NF4Dense(cfg.d_hidden)(y)
                y = nn.gelu(y, approximate=False)
                y = NF4Dense(cfg.d_model)(y)
            else:
                y = nn.Dense(cfg.d_hidden, **dense_kw)(y)
                y = nn.gelu(y, approximate=False)  # torch's default GELU is the exact one
                y = nn.Dense(cfg.d_model, **dense_kw)(y)
            return x + y.astype(x.dtype)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(cfg.n_blocks):
                x = Block()(x)
            return x

    return MLP()


def _tree_leaves(tree) -> list:
    import jax
    return [leaf for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "nbytes")]


def _jax_static_peak(compiled) -> int | None:
    """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled step: XLA's
    own account of the step's peak, available on CPU and GPU alike."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:
        return None


def build_jax_case(cfg: MLPConfig, label: str, *, impl: str = "hand", seed: int = 0) -> Case:
    """One jitted training step of the MLP in Flax under policy row `label`, hand-written
    (Flax dtype/param_dtype + jmp) or through dualprec_jax.Precision."""
    import jax
    import jax.numpy as jnp
    import optax

    if impl == "dualprec":
        return _jax_dualprec_case(cfg, label, seed)
    f32, bf16 = jnp.float32, jnp.bfloat16
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (cfg.tokens, cfg.d_model), f32)
    flops = cfg.train_flops()
    extra: dict[str, Any] = {}
    cast_in = cast_out = (lambda t: t)
    loss_scale = None
    if label == "32-true":
        model = _flax_mlp(cfg, dtype=f32, param_dtype=f32, norm_dtype=f32, precision=jax.lax.Precision.HIGHEST)
        extra["matmul_precision"] = "highest (no TF32)"
    elif label in ("bf16-mixed", "16-mixed"):
        import jmp
        half = "bfloat16" if label == "bf16-mixed" else "float16"
        jpol = jmp.get_policy(f"params=float32,compute={half},output=float32")
        cast_in, cast_out = jpol.cast_to_compute, jpol.cast_to_output
        model = _flax_mlp(cfg, dtype=jpol.compute_dtype, param_dtype=f32, norm_dtype=f32)
        if label == "16-mixed":
            loss_scale = jmp.DynamicLossScale(jnp.asarray(2.0**16, f32))
    elif label == "bf16-true":
        model = _flax_mlp(cfg, dtype=bf16, param_dtype=bf16, norm_dtype=bf16)
        x = x.astype(bf16)
    elif label == "fp8-current":
        model = _flax_mlp(cfg, dtype=bf16, param_dtype=f32, norm_dtype=f32, dot_general=_fp8_dot_general())
        extra["recipe"] = "lax.dot_general on fp8 operands, per-tensor current scaling, e4m3 fwd / e5m2 grad"
    elif label == "nf4":
        model = _flax_mlp(cfg, dtype=bf16, param_dtype=bf16, norm_dtype=bf16, nf4=True)
        x = x.astype(bf16)
        flops = cfg.frozen_train_flops()
        extra["recipe"] = "plain-jit dequantize-then-dot nf4 (frozen), bf16 compute; trains LayerNorms and biases"
        extra["flops_formula"] = "4 x linear params x tokens (no weight gradients)"
    else:
        raise KeyError(label)

    variables = jax.jit(model.init)(jax.random.PRNGKey(seed + 1), x)
    params = variables["params"]
    frozen = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def loss_fn(p, xb):
        y = cast_out(model.apply({"params": p, **frozen}, cast_in(xb)))
        return jnp.mean(jnp.square(y.astype(f32)))

    def grads_of(p, ls, xb):
        if ls is None:
            return jax.grad(loss_fn)(p, xb)
        return ls.unscale(jax.grad(lambda q: ls.scale(loss_fn(q, xb)))(p))

    def as_jmp(ls_arrays):
        # jmp's DynamicLossScale does not survive jit's argument specs in current JAX, so
        # its two arrays travel as a tuple and the object is rebuilt inside the traced step
        import jmp
        return None if ls_arrays is None else jmp.DynamicLossScale(*ls_arrays)

    def train_step(p, s, ls_arrays, xb):
        import jmp
        ls = as_jmp(ls_arrays)
        grads = grads_of(p, ls, xb)
        updates, new_s = tx.update(grads, s, p)
        new_p = optax.apply_updates(p, updates)
        if ls is None:
            return new_p, new_s, None
        finite = jmp.all_finite(grads)
        new_p, new_s = jmp.select_tree(finite, (new_p, new_s), (p, s))
        ls = ls.adjust(finite)
        return new_p, new_s, (ls.loss_scale, ls.counter)

    ls_arrays = None if loss_scale is None else (loss_scale.loss_scale, loss_scale.counter)
    jstep = jax.jit(train_step, donate_argnums=(0, 1))
    compiled = jstep.lower(params, opt_state, ls_arrays, x).compile()
    state = {"p": params, "s": opt_state, "ls": ls_arrays}
    del params, opt_state

    def step():
        state["p"], state["s"], state["ls"] = compiled(state["p"], state["s"], state["ls"], x)
        return state["p"]

    jgrad = jax.jit(lambda p, ls_arrays, xb: grads_of(p, as_jmp(ls_arrays), xb))
    held: dict[str, Any] = {}

    def forward_backward():
        held["g"] = jgrad(state["p"], state["ls"], x)
        return held["g"]

    peak = _jax_static_peak(compiled)
    extra["peak_source"] = "XLA memory_analysis of the compiled step"
    return Case("jax", label, "hand", flops, step, _jax_sync, forward_backward=forward_backward,
                weights=lambda: _tree_leaves(state["p"]) + _tree_leaves(frozen),
                grads=lambda: _tree_leaves(held.get("g")),
                optimizer_state=lambda: _tree_leaves(state["s"]),
                peak_memory=lambda: peak, extra=extra)


def _jax_dualprec_case(cfg, label, seed) -> Case:
    """The same MLP as stock linen layers (no dtype knobs) run through dualprec_jax:
    `Precision.init/apply` for the op policy, `wrap_optimizer` for loss scaling."""
    import jax
    import jax.numpy as jnp
    import optax

    from dualprec_jax import Precision

    prec = Precision(policy_row(label).spec)
    # 32-true asks for true fp32 matmuls (no TF32) in both implementations
    precision = jax.lax.Precision.HIGHEST if label == "32-true" else None
    model = _flax_mlp(cfg, dtype=None, param_dtype=jnp.float32, norm_dtype=None, precision=precision)
    x = jax.random.normal(jax.random.PRNGKey(seed), (cfg.tokens, cfg.d_model), jnp.float32)
    params = jax.jit(lambda r, xb: prec.init(model, r, xb))(jax.random.PRNGKey(seed + 1), x)["params"]
    tx = prec.wrap_optimizer(optax.adamw(1e-4))
    opt_state = tx.init(params)

    def grads_of(p, s, xb):
        def scaled_loss(q):
            y = prec.apply(model, {"params": q}, prec.convert_input(xb))
            return prec.scale_loss(jnp.mean(jnp.square(y.astype(jnp.float32))), s.loss_scale)
        return jax.grad(scaled_loss)(p)

    def train_step(p, s, xb):
        updates, s2 = tx.update(grads_of(p, s, xb), s, p)
        return optax.apply_updates(p, updates), s2

    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, x).compile()
    state = {"p": params, "s": opt_state}
    del params, opt_state

    def step():
        state["p"], state["s"] = compiled(state["p"], state["s"], x)
        return state["p"]

    jgrad = jax.jit(grads_of)
    held: dict[str, Any] = {}

    def forward_backward():
        held["g"] = jgrad(state["p"], state["s"], x)
        return held["g"]

    peak = _jax_static_peak(compiled)
    return Case("jax", label, "dualprec", cfg.train_flops(), step, _jax_sync, forward_backward=forward_backward,
                weights=lambda: _tree_leaves(state["p"]), grads=lambda: _tree_leaves(held.get("g")),
                optimizer_state=lambda: _tree_leaves(state["s"]), peak_memory=lambda: peak,
                extra={"peak_source": "XLA memory_analysis of the compiled step"})


def jax_gemm(n: int, kind: str, inner: int = 4) -> Case:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    if kind == "fp8-e4m3":
        a, b = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
        out_dtype, precision = jnp.bfloat16, None
    else:
        from dualprec.dtypes import canonical_dtype

        dtype = jnp.dtype(canonical_dtype(kind))
        a, b = a.astype(dtype), b.astype(dtype)
        out_dtype = dtype
        precision = jax.lax.Precision.HIGHEST if kind == "fp32" else None

    @jax.jit
    def many(a, b):
        # Each product takes the previous one as its operand: identical products (a @ b four
        # times) would be merged by XLA's CSE and time one GEMM as four (2139 "TFLOP/s" on an
        # H200 in the first run).
        x = b
        for _ in range(inner):
            x = jax.lax.dot_general(a, x, (((1,), (0,)), ((), ())), precision=precision,
                                    preferred_element_type=out_dtype).astype(b.dtype)
        return x

    return Case("jax", kind, "ceiling", 2.0 * n**3 * inner, lambda: many(a, b), _jax_sync)


def jax_nf4_gemv(d_in: int, d_out: int, inner: int = 10) -> Case:
    """Plain-jit dequantize-then-dot of an nf4 weight for one token, `inner` calls per step."""
    import jax
    import jax.numpy as jnp

    quantize, dequantize = _nf4_tools()
    w = jax.random.normal(jax.random.PRNGKey(0), (d_out, d_in), jnp.float32) * 0.02
    packed, absmax = jax.jit(quantize)(w)
    del w
    x = jax.random.normal(jax.random.PRNGKey(1), (1, d_in), jnp.bfloat16)

    @jax.jit
    def gemv(packed, absmax, x):
        wd = dequantize(packed, absmax, (d_out, d_in), jnp.bfloat16)
        return jax.lax.dot_general(x, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def step():
        for _ in range(inner):
            out = gemv(packed, absmax, x)
        return out
    return Case("jax", "nf4", "hand", 2.0 * d_in * d_out * inner, step, _jax_sync, extra={"calls_per_step": inner})


# --------------------------------------------------------------------------- rows


def policy_records(cfg: MLPConfig, backend: str, label: str, *, impls=("hand", "dualprec"), device: str = "cpu",
                   compiled: bool = False, compile_backend: str | None = None, warmup: int = 2, rounds: int = 3,
                   steps_per_round: int = 3, peak: bool = True) -> list:
    """Time the hand-written step and its dualprec twin for one policy, interleaved, and
    return one Record per impl; an impl dualprec cannot run yet gets a "not implemented"
    record with the reason instead of a number."""
    from .harness import STATUS_NOT_IMPLEMENTED, Record, time_interleaved

    row = policy_row(label)
    mode = "compiled" if compiled else ("jit" if backend == "jax" else "eager")
    common = dict(workload=cfg.name, backend=backend, policy=label, mode=mode, policy_spec=row.canonical(),
                  device=device if backend == "torch" else _jax_device())
    records, cases = [], {}
    for impl in impls:
        reason = dualprec_status(backend, label) if impl == "dualprec" else None
        if reason:
            records.append(Record.not_run(STATUS_NOT_IMPLEMENTED, reason, impl=impl, **common))
            continue
        if backend == "torch":
            cases[impl] = build_torch_case(cfg, label, impl=impl, device=device, compiled=compiled,
                                           compile_backend=compile_backend)
        else:
            cases[impl] = build_jax_case(cfg, label, impl=impl)
    if cases:
        sync = next(iter(cases.values())).sync
        timings = time_interleaved({k: c.step for k, c in cases.items()}, warmup=warmup, rounds=rounds,
                                   steps_per_round=steps_per_round, sync=sync)
        for impl, case in cases.items():
            rec = Record.measured(timing=timings[impl], flops_per_step=case.flops_per_step, impl=impl,
                                  extra=dict(case.extra), **common)
            rec.peak_memory_bytes = case.peak_memory() if peak else None
            records.append(rec)
    order = {impl: i for i, impl in enumerate(impls)}
    return sorted(records, key=lambda r: order[r.impl])


def micro_record(case: Case, *, workload: str, policy: str, device: str, warmup: int = 2, rounds: int = 3,
                 steps_per_round: int = 3, **fields):
    """A Record for a GEMM ceiling or a GEMV: one step function, timed alone."""
    from .harness import Record, time_steps

    timing = time_steps(case.step, warmup=warmup, rounds=rounds, steps_per_round=steps_per_round, sync=case.sync)
    return Record.measured(timing=timing, flops_per_step=case.flops_per_step, workload=workload,
                           backend=case.backend, policy=policy, impl=case.impl,
                           mode="jit" if case.backend == "jax" else "eager", device=device,
                           extra=dict(case.extra), **fields)


def _jax_device() -> str | None:
    try:
        import jax
        d = jax.devices()[0]
        return f"{d.platform}:{getattr(d, 'device_kind', '')}"
    except Exception:
        return None
