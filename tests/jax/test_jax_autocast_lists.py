"""torch's own CUDA autocast test lists, op by op, against the JAX backend on CPU.

``torch.testing._internal.autocast_test_lists.AutocastTestLists`` holds the ops and arguments
torch's CUDA autocast tests (test/test_cuda.py) run; tests/torch/test_torch_autocast_lists.py
runs them under ``dualprec_torch``.  Here each op with a JAX counterpart (the callables
``dualprec.optable`` names for its entry; plain jnp/operators for the ops on no list) runs
with the same arguments, converted to JAX arrays:

- under torch's real CUDA autocast, on fake CUDA tensors (no GPU): the dtype CUDA gives;
- under ``dualprec_jax.autocast(fn, policy)`` for bf16-mixed and 16-mixed: it must give that
  dtype, and the same bits as the JAX op run without autocast on its arguments cast as the
  list says (the check test_cuda.py makes);
- recomputed backward: the same function under ``jax.checkpoint`` (outside and inside the
  autocast) differentiated with ``jax.vjp``: the same forward bits, the same gradients as
  without the checkpoint, and every primal op the backward recomputes inside the remat region
  has a dtype the forward gave that primitive outside it.

Ops without a JAX counterpart are skipped by name with the reason (`NO_JAX`, `SKIP`).
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core

torch = pytest.importorskip("torch")
from autocast_lists_support import LISTS, entries, lists_for

from dualprec import optable
from dualprec_jax.autocast import autocast

F32 = jnp.dtype(jnp.float32)
POLICIES = [("bf16-mixed", torch.bfloat16, jnp.dtype(jnp.bfloat16)),
            ("16-mixed", torch.float16, jnp.dtype(jnp.float16))]


#: ops of the lists the op table gives no JAX counterpart (their entry's ``jax`` is empty)
NO_JAX = ("conv_tbc", "addmm", "addmv", "addr", "mv", "addbmm", "baddbmm", "poisson_nll_loss",
          "cosine_embedding_loss", "hinge_embedding_loss", "margin_ranking_loss",
          "triplet_margin_loss", "dist", "pdist", "cdist", "renorm", "addcdiv", "addcmul",
          "bilinear", "grid_sampler", "l1_loss", "smooth_l1_loss", "multilabel_margin_loss",
          "soft_margin_loss", "multi_margin_loss")
SKIP = {
    **{op: "the op table names no JAX counterpart for it" for op in NO_JAX},
    "einsum": "the list's entry is (op, equation, operands) with 2-D operands for a 4-D equation; "
              "test_cuda.py reads the operands as its ROCm skip flag and never runs it (jnp.einsum "
              "is checked in test_jax_autocast.py)",
    "equal": "returns a Python bool in torch (jnp.array_equal: a bool array), no floating dtype",
    "binary_cross_entropy": "banned under CUDA autocast; JAX has no BCE-on-probabilities function "
                            "(optax's is on logits: binary_cross_entropy_with_logits, checked)",
}


# ----- the JAX counterparts -----------------------------------------------------------------
def _conv_dims(nd):
    sp = "DHW"[-nd:] if nd <= 3 else None
    return ("NC" + sp, "OI" + sp, "NC" + sp)


def _conv(x, w):
    nd = x.ndim - 2
    return lax.conv_general_dilated(x, w, (1,) * nd, "VALID", dimension_numbers=_conv_dims(nd))


def _conv_transpose(x, w):  # torch's weight: (in, out, *kernel), the forward conv's (O, I)
    nd = x.ndim - 2
    return lax.conv_transpose(x, w, (1,) * nd, "VALID", dimension_numbers=_conv_dims(nd),
                              transpose_kernel=True)


def _flax_conv(x, w, b, *_flags, dtype=None):
    """torch's (input, weight, bias, stride 1, padding 0, ...) as a stock flax.linen.Conv."""
    layer = nn.Conv(w.shape[0], w.shape[2:], padding="VALID", dtype=dtype)
    y = layer.apply({"params": {"kernel": jnp.transpose(w, (2, 3, 1, 0)), "bias": b}},
                    jnp.transpose(x, (0, 2, 3, 1)))
    return jnp.transpose(y, (0, 3, 1, 2))


def _dense(x, w, b, dtype=None):
    """F.linear(x, w, b) as a stock flax.linen.Dense; the list's bias is 2-D (one row per
    input row, broadcast by torch): Dense runs row by row under vmap, each with its row."""
    def row(xi, bi):
        return nn.Dense(w.shape[0], dtype=dtype).apply({"params": {"kernel": w.T, "bias": bi}}, xi)
    return jax.vmap(row)(x, b) if b.ndim == 2 else row(x, b)


def _prelu(x, w):
    return nn.PReLU().apply({"params": {"negative_slope": w[0]}}, x)


def _opmath(fn):
    """``fn`` as torch's half kernels compute it: in float32, rounded once."""
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


def _lstm(x, hc, w_ih, w_hh, b, gate=jax.nn.sigmoid, act=jnp.tanh):
    h, c = hc
    gates = dict(zip("ifgo", range(4)))
    wi, wh, b = (jnp.split(t, 4) for t in (w_ih, w_hh, b))
    params = {}
    for g, k in gates.items():
        params["i" + g] = {"kernel": wi[k].T}
        params["h" + g] = {"kernel": wh[k].T, "bias": b[k]}
    _carry, y = nn.LSTMCell(h.shape[-1], gate_fn=gate, activation_fn=act).apply({"params": params}, (c, h), x)
    return y  # torch's hy (a Flax cell's carry keeps the dtype it came in)


def _gru(x, h, w_ih, w_hh, b, bhn, gate=jax.nn.sigmoid, act=jnp.tanh):
    (wir, wiz, win), (whr, whz, whn) = jnp.split(w_ih, 3), jnp.split(w_hh, 3)
    bir, biz, bin_ = jnp.split(b, 3)
    params = {"ir": {"kernel": wir.T, "bias": bir}, "iz": {"kernel": wiz.T, "bias": biz},
              "in": {"kernel": win.T, "bias": bin_}, "hr": {"kernel": whr.T}, "hz": {"kernel": whz.T},
              "hn": {"kernel": whn.T, "bias": bhn}}
    _carry, y = nn.GRUCell(h.shape[-1], gate_fn=gate, activation_fn=act).apply({"params": params}, h, x)
    return y


def _simple(act):
    def cell(x, h, w_ih, w_hh, b, act=act):
        params = {"i": {"kernel": w_ih.T, "bias": b}, "h": {"kernel": w_hh.T}}
        _carry, y = nn.SimpleCell(h.shape[-1], activation_fn=act).apply({"params": params}, h, x)
        return y
    return cell


def _scatter_add(x, dim, index, src):
    idx = list(jnp.indices(index.shape, sparse=True))
    idx[dim] = index
    return x.at[tuple(idx)].add(src)


def _norm(x, p=2, dim=None):
    return jnp.linalg.norm(x, ord=None if p == 2 else p, axis=dim)


# op -> (JAX callable as optable names it, or None for an op on no list; the call)
JAX_OPS = {
    "eq": (None, jnp.equal), "ge": (None, jnp.greater_equal), "gt": (None, jnp.greater),
    "le": (None, jnp.less_equal), "lt": (None, jnp.less), "ne": (None, jnp.not_equal),
    "add": (None, jnp.add), "div": (None, jnp.divide), "mul": (None, jnp.multiply),
    "cat": (None, jnp.concatenate), "stack": (None, jnp.stack),
    "__eq__": (None, lambda a, b: a == b), "__ge__": (None, lambda a, b: a >= b),
    "__gt__": (None, lambda a, b: a > b), "__le__": (None, lambda a, b: a <= b),
    "__lt__": (None, lambda a, b: a < b), "__ne__": (None, lambda a, b: a != b),
    "__add__": (None, lambda a, b: a + b), "__div__": (None, lambda a, b: a / b),
    "__mul__": (None, lambda a, b: a * b),
    # lower list
    "_convolution": ("flax.linen.Conv", _flax_conv), "convolution": ("flax.linen.Conv", _flax_conv),
    "conv1d": ("jax.lax.conv_general_dilated", _conv), "conv2d": ("jax.lax.conv_general_dilated", _conv),
    "conv3d": ("jax.lax.conv_general_dilated", _conv),
    "conv_transpose1d": ("jax.lax.conv_transpose", _conv_transpose),
    "conv_transpose2d": ("jax.lax.conv_transpose", _conv_transpose),
    "conv_transpose3d": ("jax.lax.conv_transpose", _conv_transpose),
    # cuDNN's kernels (input, weight, padding, stride, dilation, groups, flags): stride and
    # dilation 1, no padding in the list
    "cudnn_convolution": ("jax.lax.conv_general_dilated", lambda x, w, *flags: _conv(x, w)),
    "cudnn_convolution_transpose": ("jax.lax.conv_transpose", lambda x, w, *flags: _conv_transpose(x, w)),
    "prelu": ("flax.linen.PReLU", _prelu),
    "matmul": ("jax.numpy.matmul", jnp.matmul), "mm": ("jax.lax.dot", lax.dot),
    "bmm": ("jax.lax.batch_matmul", lax.batch_matmul),
    "chain_matmul": ("jax.numpy.linalg.multi_dot", lambda *m: jnp.linalg.multi_dot(m)),
    "lstm_cell": ("flax.linen.LSTMCell", _lstm), "gru_cell": ("flax.linen.GRUCell", _gru),
    "rnn_tanh_cell": ("flax.linen.SimpleCell", _simple(jnp.tanh)),
    "rnn_relu_cell": ("flax.linen.SimpleCell", _simple(jax.nn.relu)),
    "linear": ("flax.linen.Dense", _dense),
    "linalg_vecdot": ("jax.numpy.linalg.vecdot", jnp.linalg.vecdot),
    "linalg_multi_dot": ("jax.numpy.linalg.multi_dot", jnp.linalg.multi_dot),
    "__matmul__": ("jax.Array.__matmul__", lambda a, b: a @ b),
    # fp32 list
    "acos": ("jax.numpy.arccos", jnp.arccos), "asin": ("jax.numpy.arcsin", jnp.arcsin),
    "cosh": ("jax.numpy.cosh", jnp.cosh), "sinh": ("jax.numpy.sinh", jnp.sinh),
    "tan": ("jax.numpy.tan", jnp.tan), "exp": ("jax.numpy.exp", jnp.exp),
    "expm1": ("jax.numpy.expm1", jnp.expm1), "log": ("jax.numpy.log", jnp.log),
    "log1p": ("jax.numpy.log1p", jnp.log1p), "log2": ("jax.numpy.log2", jnp.log2),
    "log10": ("jax.numpy.log10", jnp.log10),
    "erfinv": ("jax.scipy.special.erfinv", jax.scipy.special.erfinv),
    "reciprocal": ("jax.numpy.reciprocal", jnp.reciprocal), "rsqrt": ("jax.lax.rsqrt", lax.rsqrt),
    "pow": ("jax.numpy.power", jnp.power), "__pow__": ("jax.Array.__pow__", lambda a, b: a ** b),
    "softmax": ("jax.nn.softmax", lambda x, dim: jax.nn.softmax(x, axis=dim)),
    "log_softmax": ("jax.nn.log_softmax", lambda x, dim: jax.nn.log_softmax(x, axis=dim)),
    "layer_norm": ("flax.linen.LayerNorm",
                   lambda x, shape: nn.LayerNorm(use_bias=False, use_scale=False).apply({}, x)),
    "rms_norm": ("flax.linen.RMSNorm", lambda x, shape: nn.RMSNorm(use_scale=False).apply({}, x)),
    "group_norm": ("flax.linen.GroupNorm", lambda x, groups: nn.GroupNorm(
        num_groups=groups, use_bias=False, use_scale=False).apply({}, x)),
    "norm": ("jax.numpy.linalg.norm", _norm),
    "cosine_similarity": ("optax.cosine_similarity", optax.cosine_similarity),
    "kl_div": ("optax.kl_divergence", optax.kl_divergence),
    "binary_cross_entropy_with_logits": ("optax.sigmoid_binary_cross_entropy",
                                         optax.sigmoid_binary_cross_entropy),
    "cumprod": ("jax.numpy.cumprod", lambda x, dim: jnp.cumprod(x, axis=dim)),
    "cumsum": ("jax.numpy.cumsum", lambda x, dim: jnp.cumsum(x, axis=dim)),
    "prod": ("jax.numpy.prod", lambda x, dim=None: jnp.prod(x, axis=dim)),
    "sum": ("jax.numpy.sum", lambda x, dim=None: jnp.sum(x, axis=dim)),
    "logsumexp": ("jax.nn.logsumexp", lambda x, dim: jax.nn.logsumexp(x, axis=dim)),
    "softplus": ("jax.nn.softplus", jax.nn.softplus),
    "nll_loss": ("optax.softmax_cross_entropy_with_integer_labels",
                 optax.softmax_cross_entropy_with_integer_labels),
    "nll_loss2d": ("optax.softmax_cross_entropy_with_integer_labels",
                   lambda x, t: optax.softmax_cross_entropy_with_integer_labels(
                       jnp.moveaxis(x, 1, -1), t)),
    "mse_loss": ("optax.squared_error", optax.squared_error),
    # promote list
    "atan2": ("jax.numpy.arctan2", jnp.arctan2), "cross": ("jax.numpy.cross", jnp.cross),
    "dot": ("jax.numpy.vdot", jnp.vdot), "vdot": ("jax.numpy.vdot", jnp.vdot),
    "index_put": ("jax.Array.at[].set", lambda x, idx, v: x.at[idx].set(v)),
    "tensordot": ("jax.numpy.tensordot", jnp.tensordot),
    "scatter_add": ("jax.Array.at[].add", _scatter_add),
}


def _fused(layer):
    """The control for a stock layer with a bias, CUDA's fused kernel: the layer on arguments
    cast to the compute dtype, computed in float32 (exact products, float32 accumulation, the
    bias added) and rounded once.  (Flax's layer run in the compute dtype rounds twice: the
    product, then the bias add.)"""
    def control(x, *rest):
        return layer(x, *rest, dtype=jnp.float32).astype(x.dtype)
    return control


#: ops whose control is not their JAX call on the cast arguments (see `_fused`)
CONTROL = {"_convolution": _fused(_flax_conv), "convolution": _fused(_flax_conv), "linear": _fused(_dense),
           "lstm_cell": lambda *a: _cell_control("lstm", *a), "gru_cell": lambda *a: _cell_control("gru", *a),
           "rnn_tanh_cell": lambda *a: _cell_control("tanh", *a),
           "rnn_relu_cell": lambda *a: _cell_control("relu", *a)}


def _cell_control(kind, x, h, w_ih, w_hh, b, bhn=None):
    """A Flax cell's formula on arguments cast to the compute dtype, each Dense as CUDA's
    fused linear (`_fused`: the bias before the one rounding; Flax's Dense in the compute
    dtype rounds twice) and sigmoid/tanh as torch's half kernels compute them (float32, one
    rounding; JAX's own half sigmoid and tanh round differently)."""
    def lin(v, w, b=None):
        y = jnp.matmul(v.astype(F32), w.T.astype(F32))
        return (y if b is None else y + b.astype(F32)).astype(v.dtype)

    sig, tanh = _opmath(lambda v: 1 / (1 + jnp.exp(-v))), _opmath(jnp.tanh)  # torch's sigmoid kernel
    if kind in ("tanh", "relu"):
        act = tanh if kind == "tanh" else jax.nn.relu
        return act(lin(x, w_ih, b) + lin(h, w_hh))
    if kind == "lstm":
        h, c = h
        wi, wh, b = (jnp.split(t, 4) for t in (w_ih, w_hh, b))
        i, f, g, o = (lin(x, wi[k]) + lin(h, wh[k], b[k]) for k in range(4))
        c = sig(f) * c + sig(i) * tanh(g)
        return sig(o) * tanh(c)
    (wir, wiz, win), (whr, whz, whn) = jnp.split(w_ih, 3), jnp.split(w_hh, 3)
    bir, biz, bin_ = jnp.split(b, 3)
    r = sig(lin(x, wir, bir) + lin(h, whr))
    z = sig(lin(x, wiz, biz) + lin(h, whz))
    n = tanh(lin(x, win, bin_) + r * lin(h, whn, bhn))
    return (1 - z) * n + z * h

def _cell_args(op, args):
    """torch's (input, hidden, w_ih, w_hh, b_ih, b_hh) for a Flax cell, which has one bias per
    gate: b_ih + b_hh summed here, in float32, before the call (GRU: the new gate's b_hn stays
    apart, it is applied inside the reset gate's product in both)."""
    x, h, w_ih, w_hh, b_ih, b_hh = args
    if op != "gru_cell":
        return x, h, w_ih, w_hh, b_ih + b_hh
    n = b_ih.shape[0] // 3
    return x, h, w_ih, w_hh, jnp.concatenate([b_ih[:2 * n] + b_hh[:2 * n], b_ih[2 * n:]]), b_hh[2 * n:]


def _to_jax(a):
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            return jnp.asarray(a.detach().numpy())
        return jnp.asarray(a.detach().numpy().astype(np.int32))  # no int64 without x64
    if isinstance(a, (tuple, list)) and a and isinstance(a[0], torch.Tensor):
        return type(a)(_to_jax(t) for t in a)
    return a


def _cast(args, dtype):
    def one(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(dtype)
        if isinstance(a, (tuple, list)):
            return type(a)(one(t) for t in a)
        return a
    return tuple(one(a) for a in args)


# ----- torch's lists and CUDA's answers (as in the torch test) ---------------------------------


ENTRIES = [(name, i, op) for name in LISTS for i, (op, *_r) in enumerate(entries(lists_for("cpu")[1], name))]


def _torch_fn(kind, op):
    if kind == "method":
        return lambda *a, **k: getattr(a[0], op)(*a[1:], **k)
    return getattr({"torch": torch, "nn": torch._C._nn, "linalg": torch._C._linalg}[kind], op)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


#: CUDA autocast's promote kernels refuse a half operand that is not the compute dtype
#: (float16 under bf16-mixed); JAX's autocast promotes it by JAX's rules (float32) instead
REFUSED = "Unexpected floating ScalarType in at::autocast::prioritize"
_NO_CUDA = ("not linked with support for cuda", "Torch not compiled with CUDA", "Found no NVIDIA driver")


@functools.cache
def _cuda(name, i, compute):
    """The dtype torch's real CUDA autocast gives (fake CUDA tensors), or None where the fake
    run needs a CUDA build (the list's own expectation stands in)."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    mode, lists = lists_for("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", compute)
    try:
        with mode, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op, args, kwargs, _ = list(entries(lists, name))[i]
            try:
                out = _first(_torch_fn(LISTS[name][0], op)(*args, **kwargs))
            except (RuntimeError, TypeError, NotImplementedError, AssertionError) as e:
                if any(s in str(e) for s in _NO_CUDA):
                    return None
                if REFUSED in str(e):
                    return REFUSED
                raise
            return out.dtype
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])
        torch.clear_autocast_cache()


_JNP_OF = {torch.float32: F32, torch.bfloat16: jnp.dtype(jnp.bfloat16), torch.float16: jnp.dtype(jnp.float16),
           torch.bool: jnp.dtype(bool)}


# ----- the recomputation check ----------------------------------------------------------------
def _primal(jaxpr, tainted, in_remat=False, found=None):
    """(primitive, dtype, inside a remat region) of every equation of ``jaxpr`` (a backward)
    that depends on no cotangent (``tainted``): the primal ops and residuals it computes,
    sub-jaxprs included."""
    found = [] if found is None else found
    tainted = set(tainted)
    for e in jaxpr.eqns:
        ins = [isinstance(v, core.Var) and v in tainted for v in e.invars]
        subs = [s.jaxpr if isinstance(s, core.ClosedJaxpr) else s for p in e.params.values()
                for s in (p if isinstance(p, (tuple, list)) else (p,))
                if isinstance(s, (core.Jaxpr, core.ClosedJaxpr))]
        remat = e.primitive.name in ("checkpoint", "remat", "remat2")
        for body in subs:
            inner = {bv for bv, t in zip(body.invars, ins) if t} if len(body.invars) == len(ins) \
                else set(body.invars) if any(ins) else set()
            _primal(body, inner, in_remat or remat, found)
        if any(ins):
            tainted.update(e.outvars)
        elif not subs:
            found += [(e.primitive.name, v.aval.dtype, in_remat) for v in e.outvars]
    return found


def _backward(fun, ct, primals):
    back = jax.make_jaxpr(lambda c, *p: jax.vjp(fun, *p)[1](c))(ct, *primals)
    return _primal(back.jaxpr, back.jaxpr.invars[:1])


# ----- the test ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,compute_t,compute", POLICIES, ids=[p for p, *_ in POLICIES])
@pytest.mark.parametrize("name,i,op", ENTRIES, ids=[f"{n}-{i}-{op}" for n, i, op in ENTRIES])
def test_cuda_autocast_list_entry_jax(name, i, op, policy, compute_t, compute):
    if op in SKIP:
        pytest.skip(SKIP[op])
    jax_name, fn = JAX_OPS[op]
    _kind, control_as = LISTS[name]
    e = optable.entry(op) or optable.entry(f"torch.Tensor.{op}")
    if jax_name is None:
        assert e is None, f"{op} is on the {e.list} list: name its JAX counterpart from the op table"
    else:
        assert e is not None and (jax_name in e.jax or jax_name.rsplit(".", 1)[1] in e.jax_primitives), (
            f"{jax_name} is not a JAX counterpart of {op} in dualprec.optable")
    want_t = _cuda(name, i, compute_t)
    _, targs, kwargs, extra = list(entries(lists_for("cpu")[1], name))[i]
    args = tuple(_to_jax(a) for a in targs)
    if op.endswith("_cell"):
        args = _cell_args(op, args)
    cast_to = {"compute": compute, "float32": F32, None: None}[control_as]
    if want_t is None:  # needs a CUDA build: the list's expectation
        assert cast_to is not None
        want = cast_to
    elif want_t == REFUSED:  # CUDA raises; JAX promotes (float16 with float32: float32)
        assert e is not None and e.list == "promote" and policy == "bf16-mixed", (op, policy)
        floats = [a.dtype for a in jax.tree_util.tree_leaves(args)
                  if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
        assert jnp.dtype(jnp.float16) in floats and jnp.result_type(*floats) == F32
        want = F32
    else:
        want = _JNP_OF[want_t]

    got = autocast(fn, policy)(*args, **kwargs)
    assert got.dtype == want, f"{op}: CUDA gives {want}, dualprec_jax.autocast {got.dtype}"
    if isinstance(extra, torch.dtype):
        assert got.dtype == _JNP_OF[extra]  # the dtype the list itself states
    if cast_to is not None:
        assert want == cast_to
    control_fn = CONTROL.get(op, fn)
    with jax.disable_jit():  # op by op, as autocast evaluates it eagerly (no fusion, no FMA)
        control = control_fn(*(args if cast_to is None else _cast(args, cast_to)), **kwargs)
    assert control.dtype == got.dtype
    assert np.array_equal(np.asarray(got), np.asarray(control), equal_nan=True), (
        f"{op}: not the bits of the JAX op on arguments cast to {cast_to}")

    # recomputed backward: the op inside a remat region, differentiated outside it
    if not jnp.issubdtype(got.dtype, jnp.floating):
        return
    diff = [k for k, a in enumerate(args) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]
    if not diff:
        return

    def region(*d):
        full = list(args)
        for k, a in zip(diff, d):
            full[k] = a
        y = fn(*full, **kwargs)
        return y * y  # mul keeps y for the backward: the region is recomputed

    primals = [args[k] for k in diff]
    plain = autocast(region, policy)
    y0, vjp0 = jax.vjp(plain, *primals)
    ct = jnp.ones_like(y0)
    g0 = vjp0(ct)
    forward = {}  # primitive -> dtypes, without recomputation (primal and residuals)
    for p, d, _ in _backward(plain, ct, primals):
        forward.setdefault(p, set()).add(d)
    for where, fun in (("checkpoint outside autocast", jax.checkpoint(plain)),
                       ("checkpoint inside autocast", autocast(jax.checkpoint(region), policy))):
        y1, vjp1 = jax.vjp(fun, *primals)
        assert y1.dtype == y0.dtype and np.array_equal(np.asarray(y1), np.asarray(y0), equal_nan=True), where
        g1 = vjp1(ct)
        for a, b, p in zip(g1, g0, primals):
            assert a.dtype == b.dtype == p.dtype, (where, a.dtype, b.dtype, p.dtype)
            assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True), (
                f"{op} ({where}): gradients differ from the ones without recomputation")
        again = [(p, d) for p, d, in_remat in _backward(fun, ct, primals) if in_remat]
        assert again, f"{op} ({where}): the backward recomputes nothing"
        wrong = [(p, d) for p, d in again if d not in forward.get(p, ())]
        assert not wrong, f"{op} ({where}): recomputed in other dtypes than without recomputation: {wrong}"
