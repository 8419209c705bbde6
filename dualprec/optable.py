"""The mixed-precision op table: torch's CUDA autocast lists, as backend-neutral data.

Under a mixed policy (params wider than a bfloat16/float16 compute dtype) every op is on
one of three lists, or on none:

- ``"lower"``: matmul-likes (mm, matmul, linear, conv, einsum, sdpa, RNN cells, ...).
  Floating operands other than float64, the bias included, are cast to the compute dtype;
  products accumulate in float32 and are rounded once; the output has the compute dtype.
- ``"fp32"``: exp, log, pow, rsqrt, softmax, layer_norm, sum, cumsum, the losses, ...
  Floating operands other than float64 are cast to float32; the output is float32.
- ``"promote"``: addcmul, atan2, index_put, scatter_add, tensordot, ...  Floating operands
  are cast to the widest floating dtype among them.
- every other op runs in its inputs' dtype (plain type promotion).  mean, var, std,
  batch_norm and gelu are on no list: they stay in bfloat16/float16.

One aten op, ``binary_cross_entropy``, is refused by CUDA autocast (it is unsafe in half
precision; use ``binary_cross_entropy_with_logits``): it is in `BANNED`, not in `ENTRIES`.

The table is data only (no torch or JAX import).  Each `OpEntry` names the aten ops
(overloads included) that carry torch's AutocastCUDA kernel for it, the Python callables
torch users reach it through, and the JAX counterparts a JAX autocast maps to it: public
functions (``jax.numpy.exp``) and, where one primitive stands for the op, jaxpr primitive
names (``exp``).  A primitive is claimed by at most one entry; composites (softmax,
logsumexp, layer_norm, the losses) have JAX function names but no primitive, because they
dissolve into primitives (reduce_max, sub, exp, ...) that a jaxpr rewriter must recognise
as a whole or intercept before tracing.

`tests/spec/test_spec_optable.py` keeps the table equal to the installed torch: the set of
aten ops with an AutocastCUDA kernel is exactly the table's (plus the ops only CUDA builds
register, `CUDA_BUILD_ONLY`), and each entry's list is the one torch's kernels apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import ALL_DTYPES, HALF_DTYPES, dtype_bits

__all__ = [
    "OpEntry", "ENTRIES", "BANNED", "LOWER", "FP32", "PROMOTE", "LISTS", "CUDA_BUILD_ONLY",
    "entry", "op_list", "dtype_of", "aten_lists", "torch_cast_policy", "table_rows", "render_table",
]

LISTS = ("lower", "fp32", "promote")
_HALF = HALF_DTYPES
_FLOATS = ALL_DTYPES
_WIDTH = {name: dtype_bits(name) for name in ALL_DTYPES}


@dataclass(frozen=True)
class OpEntry:
    """One row of the op table.

    ``aten``: the aten op names with overload (``"pow.Tensor_Scalar"``; ``"exp"`` is the
    default overload) that carry the AutocastCUDA kernel.  ``torch``: the public Python
    callables (``torch.exp``, ``torch.Tensor.exp``, ``torch.nn.functional.softmax``,
    ``torch.nn.LayerNorm``).  ``jax``: public JAX/Flax/optax callables.
    ``jax_primitives``: jaxpr primitive names that stand for this op alone.
    ``respects_dtype``: the op has a ``dtype=`` argument and an explicit one is kept (torch's
    ``fp32_set_opt_dtype`` policy: ``x.sum(dtype=torch.bfloat16)`` stays bfloat16).
    """

    name: str
    list: str
    aten: tuple[str, ...]
    torch: tuple[str, ...] = ()
    jax: tuple[str, ...] = ()
    jax_primitives: tuple[str, ...] = ()
    respects_dtype: bool = False
    note: str = ""

    def __post_init__(self):
        if self.list not in LISTS + ("banned",):
            raise ValueError(f"{self.name}: list must be one of {LISTS}, got {self.list!r}")

    @property
    def aten_qualified(self) -> tuple[str, ...]:
        """``aten::name.overload`` strings, as torch's dispatcher spells them."""
        return tuple(f"aten::{a}" for a in self.aten)


def _fn(*names: str) -> tuple[str, ...]:
    """torch.X and torch.Tensor.X for each name."""
    out = []
    for n in names:
        out += [f"torch.{n}", f"torch.Tensor.{n}"]
    return tuple(out)


F = "torch.nn.functional."
NN = "torch.nn."
JNP = "jax.numpy."
LAX = "jax.lax."

_LOWER = [
    OpEntry("conv", "lower",
            ("_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "convolution",
             "cudnn_convolution"),
            ("torch.conv1d", "torch.conv2d", "torch.conv3d", F + "conv1d", F + "conv2d", F + "conv3d",
             NN + "Conv1d", NN + "Conv2d", NN + "Conv3d"),
            (LAX + "conv_general_dilated", LAX + "conv", LAX + "conv_with_general_padding",
             JNP + "convolve", "flax.linen.Conv", "flax.nnx.Conv"),
            ("conv_general_dilated",),
            note="the bias is cast to the compute dtype and added before the one rounding"),
    OpEntry("conv_transpose", "lower",
            ("conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
             "cudnn_convolution_transpose"),
            ("torch.conv_transpose1d", "torch.conv_transpose2d", "torch.conv_transpose3d",
             F + "conv_transpose1d", F + "conv_transpose2d", F + "conv_transpose3d",
             NN + "ConvTranspose1d", NN + "ConvTranspose2d", NN + "ConvTranspose3d"),
            (LAX + "conv_transpose", "flax.linen.ConvTranspose", "flax.nnx.ConvTranspose"),
            note="JAX lowers a transposed convolution to conv_general_dilated"),
    OpEntry("conv_tbc", "lower", ("conv_tbc",), ("torch.conv_tbc",)),
    OpEntry("prelu", "lower", ("prelu",), ("torch.prelu", F + "prelu", NN + "PReLU"),
            ("flax.linen.PReLU",)),
    OpEntry("mm", "lower", ("mm",), _fn("mm"), (LAX + "dot",)),
    OpEntry("mv", "lower", ("mv",), _fn("mv")),
    OpEntry("bmm", "lower", ("bmm",), _fn("bmm"), (LAX + "batch_matmul",)),
    OpEntry("matmul", "lower", ("matmul",),
            _fn("matmul") + ("torch.Tensor.__matmul__", "torch.Tensor.__rmatmul__"),
            (JNP + "matmul", JNP + "dot", JNP + "inner", "jax.Array.__matmul__", LAX + "dot_general"),
            ("dot_general",),
            note="dot_general is also what jnp.tensordot/jnp.vdot trace to (promote list): the two "
                 "lists differ only when operand dtypes differ"),
    OpEntry("einsum", "lower", ("einsum",), ("torch.einsum",), (JNP + "einsum", "flax.nnx.Einsum")),
    OpEntry("linear", "lower", ("linear",), (F + "linear", NN + "Linear"),
            ("flax.linen.Dense", "flax.linen.DenseGeneral", "flax.linen.Einsum", "flax.nnx.Linear",
             "flax.nnx.LinearGeneral"),
            note="weight and bias cast to the compute dtype; bias added in float32 before the one "
                 "rounding (a hand-written x @ w + b is matmul, then a promoting add)"),
    OpEntry("addmm", "lower", ("addmm",), _fn("addmm")),
    OpEntry("addmv", "lower", ("addmv",), _fn("addmv")),
    OpEntry("addr", "lower", ("addr",), _fn("addr")),
    OpEntry("addbmm", "lower", ("addbmm",), _fn("addbmm")),
    OpEntry("baddbmm", "lower", ("baddbmm",), _fn("baddbmm")),
    OpEntry("linalg_vecdot", "lower", ("linalg_vecdot",), ("torch.linalg.vecdot",),
            (JNP + "vecdot", JNP + "linalg.vecdot")),
    OpEntry("multi_dot", "lower", ("chain_matmul", "linalg_multi_dot"),
            ("torch.chain_matmul", "torch.linalg.multi_dot"), (JNP + "linalg.multi_dot",)),
    OpEntry("rnn_cell", "lower",
            ("_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell",
             "rnn_relu_cell"),
            (NN + "LSTMCell", NN + "GRUCell", NN + "RNNCell"),
            ("flax.linen.LSTMCell", "flax.linen.GRUCell", "flax.linen.SimpleCell", "flax.nnx.LSTMCell",
             "flax.nnx.GRUCell", "flax.nnx.SimpleCell")),
    OpEntry("cudnn_rnn", "lower", ("_cudnn_rnn",), (NN + "LSTM", NN + "GRU", NN + "RNN"),
            ("flax.linen.RNN", "flax.nnx.RNN"),
            note="registered by CUDA builds with cuDNN only (nn.LSTM/GRU/RNN on a GPU); CPU "
                 "autocast's mkldnn_rnn_layer does the same on CPU"),
    OpEntry("scaled_dot_product_attention", "lower",
            ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention"),
            (F + "scaled_dot_product_attention",),
            ("jax.nn.dot_product_attention", "flax.linen.dot_product_attention",
             "flax.nnx.dot_product_attention"),
            note="softmax inside the fused kernel is not a separate op"),
]

_UNARY_FP32 = [
    # name, jnp name, lax name / primitive
    ("acos", "arccos", "acos"), ("asin", "arcsin", "asin"), ("cosh", "cosh", "cosh"),
    ("sinh", "sinh", "sinh"), ("tan", "tan", "tan"), ("exp", "exp", "exp"), ("expm1", "expm1", "expm1"),
    ("log", "log", "log"), ("log1p", "log1p", "log1p"),
]

_FP32 = [OpEntry(n, "fp32", (n,), _fn(n) + (("torch.special." + n,) if n in ("expm1", "log1p") else ()),
                 (JNP + j, LAX + p), (p,)) for n, j, p in _UNARY_FP32]
_FP32 += [
    OpEntry("log2", "fp32", ("log2",), _fn("log2"), (JNP + "log2",),
            note="jnp.log2 is log(x) / log(2): no primitive of its own"),
    OpEntry("log10", "fp32", ("log10",), _fn("log10"), (JNP + "log10",),
            note="jnp.log10 is log(x) / log(10): no primitive of its own"),
    OpEntry("erfinv", "fp32", ("erfinv",), _fn("erfinv") + ("torch.special.erfinv",),
            ("jax.scipy.special.erfinv", LAX + "erf_inv"), ("erf_inv",)),
    OpEntry("reciprocal", "fp32", ("reciprocal",), _fn("reciprocal"), (JNP + "reciprocal",),
            note="jnp.reciprocal traces to integer_pow(x, -1)"),
    OpEntry("rsqrt", "fp32", ("rsqrt",), _fn("rsqrt"), (LAX + "rsqrt",), ("rsqrt",),
            note="1 / sqrt(x) is sqrt and div, on no list, in both frameworks"),
    OpEntry("pow", "fp32", ("pow.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor"),
            _fn("pow") + ("torch.Tensor.__pow__", "torch.Tensor.__rpow__", "torch.square", "torch.Tensor.square"),
            (JNP + "power", JNP + "square", "jax.Array.__pow__", LAX + "pow", LAX + "integer_pow", LAX + "square"),
            ("pow", "integer_pow", "square"),
            note="x ** 2 and torch.square are pow in torch; JAX's integer_pow also appears inside "
                 "composites on no list (jax.nn.gelu's tanh form), which keep their input dtype"),
    OpEntry("softplus", "fp32", ("softplus",), (F + "softplus", NN + "Softplus"), ("jax.nn.softplus",)),
    OpEntry("layer_norm", "fp32", ("layer_norm", "native_layer_norm"), (F + "layer_norm", "torch.layer_norm",
                                                                       NN + "LayerNorm"),
            ("flax.linen.LayerNorm", "flax.nnx.LayerNorm"), note="mean/var inside it run in float32"),
    OpEntry("rms_norm", "fp32", ("rms_norm",), (F + "rms_norm", "torch.rms_norm", NN + "RMSNorm"),
            ("flax.linen.RMSNorm", "flax.nnx.RMSNorm")),
    OpEntry("group_norm", "fp32", ("group_norm",), (F + "group_norm", "torch.group_norm", NN + "GroupNorm"),
            ("flax.linen.GroupNorm", "flax.nnx.GroupNorm")),
    OpEntry("norm", "fp32",
            ("norm.Scalar", "norm.ScalarOpt_dim", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
             "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord"),
            _fn("norm") + ("torch.linalg.norm", "torch.linalg.vector_norm", "torch.linalg.matrix_norm",
                           "torch.nuclear_norm", "torch.frobenius_norm", F + "normalize"),
            (JNP + "linalg.norm", JNP + "linalg.vector_norm", JNP + "linalg.matrix_norm"),
            respects_dtype=True,
            note="F.normalize divides by a float32 norm, so it returns float32"),
    OpEntry("cosine_similarity", "fp32", ("cosine_similarity",), ("torch.cosine_similarity",
                                                                  F + "cosine_similarity", NN + "CosineSimilarity"),
            ("optax.cosine_similarity",)),
    OpEntry("distance", "fp32", ("dist", "pdist", "cdist"), _fn("dist") + ("torch.cdist", "torch.pdist",
                                                                          F + "pdist", F + "pairwise_distance"),
            (), note="F.pairwise_distance reaches norm"),
    OpEntry("renorm", "fp32", ("renorm",), _fn("renorm")),
    OpEntry("logsumexp", "fp32", ("logsumexp",), _fn("logsumexp") + ("torch.special.logsumexp",),
            ("jax.nn.logsumexp", "jax.scipy.special.logsumexp")),
    OpEntry("softmax", "fp32", ("softmax.int",),
            _fn("softmax") + (F + "softmax", "torch.special.softmax", NN + "Softmax"),
            ("jax.nn.softmax",), respects_dtype=True,
            note="composite in JAX: reduce_max, sub, exp, reduce_sum, div"),
    OpEntry("log_softmax", "fp32", ("log_softmax.int",),
            _fn("log_softmax") + (F + "log_softmax", "torch.special.log_softmax", NN + "LogSoftmax"),
            ("jax.nn.log_softmax",), respects_dtype=True),
    OpEntry("sum", "fp32", ("sum", "sum.dim_IntList"), _fn("sum"), (JNP + "sum", LAX + "reduce_sum"),
            ("reduce_sum",), respects_dtype=True,
            note="jnp.sum of a half array traces to convert -> reduce_sum -> convert"),
    OpEntry("prod", "fp32", ("prod", "prod.dim_int"), _fn("prod"), (JNP + "prod",), ("reduce_prod",),
            respects_dtype=True),
    OpEntry("cumsum", "fp32", ("cumsum",), _fn("cumsum"), (JNP + "cumsum", LAX + "cumsum"), ("cumsum",),
            respects_dtype=True),
    OpEntry("cumprod", "fp32", ("cumprod",), _fn("cumprod"), (JNP + "cumprod", LAX + "cumprod"), ("cumprod",),
            respects_dtype=True),
    OpEntry("upsample_nearest", "fp32",
            ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
             "_upsample_nearest_exact2d", "_upsample_nearest_exact3d"),
            (F + "interpolate", NN + "Upsample", NN + "UpsamplingNearest2d"), ("jax.image.resize",),
            note='F.interpolate(mode="nearest" / "nearest-exact")'),
    OpEntry("upsample_linear", "fp32",
            ("upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d"),
            (F + "interpolate", NN + "Upsample", NN + "UpsamplingBilinear2d"), ("jax.image.resize",),
            note='F.interpolate(mode="linear" / "bilinear" / "trilinear")'),
    OpEntry("upsample_bicubic", "fp32", ("upsample_bicubic2d", "_upsample_bicubic2d_aa"),
            (F + "interpolate", NN + "Upsample"), ("jax.image.resize",), note='F.interpolate(mode="bicubic")'),
]

_LOSSES = [
    ("nll_loss", ("nll_loss", "nll_loss2d"), (F + "nll_loss", F + "cross_entropy", NN + "NLLLoss",
                                             NN + "CrossEntropyLoss"),
     ("optax.softmax_cross_entropy", "optax.softmax_cross_entropy_with_integer_labels")),
    ("mse_loss", ("mse_loss",), (F + "mse_loss", NN + "MSELoss"), ("optax.l2_loss", "optax.squared_error")),
    ("l1_loss", ("l1_loss",), (F + "l1_loss", NN + "L1Loss"), ()),
    ("smooth_l1_loss", ("smooth_l1_loss",), (F + "smooth_l1_loss", NN + "SmoothL1Loss"), ()),
    ("huber_loss", ("huber_loss",), (F + "huber_loss", NN + "HuberLoss"), ("optax.huber_loss",)),
    ("kl_div", ("kl_div",), (F + "kl_div", NN + "KLDivLoss"), ("optax.kl_divergence",)),
    ("binary_cross_entropy_with_logits", ("binary_cross_entropy_with_logits",),
     (F + "binary_cross_entropy_with_logits", NN + "BCEWithLogitsLoss"), ("optax.sigmoid_binary_cross_entropy",)),
    ("poisson_nll_loss", ("poisson_nll_loss",), (F + "poisson_nll_loss", NN + "PoissonNLLLoss"), ()),
    ("cosine_embedding_loss", ("cosine_embedding_loss",), (F + "cosine_embedding_loss",
                                                          NN + "CosineEmbeddingLoss"), ()),
    ("hinge_embedding_loss", ("hinge_embedding_loss",), (F + "hinge_embedding_loss", NN + "HingeEmbeddingLoss"),
     ()),
    ("margin_ranking_loss", ("margin_ranking_loss",), (F + "margin_ranking_loss", NN + "MarginRankingLoss"), ()),
    ("multilabel_margin_loss", ("multilabel_margin_loss",), (F + "multilabel_margin_loss",
                                                            NN + "MultiLabelMarginLoss"), ()),
    ("soft_margin_loss", ("soft_margin_loss",), (F + "soft_margin_loss", NN + "SoftMarginLoss"), ()),
    ("triplet_margin_loss", ("triplet_margin_loss",), (F + "triplet_margin_loss", NN + "TripletMarginLoss"), ()),
    ("multi_margin_loss", ("multi_margin_loss",), (F + "multi_margin_loss", NN + "MultiMarginLoss"), ()),
]
_FP32 += [OpEntry(n, "fp32", a, t, j, note="loss") for n, a, t, j in _LOSSES]

_PROMOTE = [
    OpEntry("addcdiv", "promote", ("addcdiv",), _fn("addcdiv")),
    OpEntry("addcmul", "promote", ("addcmul",), _fn("addcmul")),
    OpEntry("atan2", "promote", ("atan2",), _fn("atan2") + _fn("arctan2"), (JNP + "arctan2", LAX + "atan2"),
            ("atan2",)),
    OpEntry("bilinear", "promote", ("bilinear",), (F + "bilinear", NN + "Bilinear")),
    OpEntry("cross", "promote", ("cross",), _fn("cross"), (JNP + "cross",)),
    OpEntry("dot", "promote", ("dot", "vdot"), _fn("dot") + _fn("vdot"), (JNP + "vdot",),
            note="1-D dot products; jnp.dot is matmul's counterpart"),
    OpEntry("grid_sampler", "promote", ("grid_sampler",), (F + "grid_sample",)),
    OpEntry("index_put", "promote", ("index_put",), _fn("index_put"), ("jax.Array.at[].set",),
            note="out of place only: x[i] = v and index_put_ are in-place ops on no list; JAX's "
                 "x.at[i].set(v) is a scatter primitive"),
    OpEntry("scatter_add", "promote", ("scatter_add",), _fn("scatter_add"), ("jax.Array.at[].add",),
            ("scatter-add",),
            note="jnp's x.at[i].add(v) casts v to x's dtype before the primitive: promote from torch "
                 "needs the cast seen before it"),
    OpEntry("tensordot", "promote", ("tensordot",), ("torch.tensordot",), (JNP + "tensordot",)),
]

#: Ops CUDA autocast refuses (it raises); not in ENTRIES.
BANNED = (
    OpEntry("binary_cross_entropy", "banned", ("binary_cross_entropy",),
            (F + "binary_cross_entropy", NN + "BCELoss"), ("optax.sigmoid_binary_cross_entropy",),
            note="unsafe to autocast: torch raises under CUDA autocast; use binary_cross_entropy_with_logits"),
)

#: Every listed op: the three lists in torch's order.
ENTRIES: tuple[OpEntry, ...] = tuple(_LOWER + _FP32 + _PROMOTE)
LOWER = tuple(e for e in ENTRIES if e.list == "lower")
FP32 = tuple(e for e in ENTRIES if e.list == "fp32")
PROMOTE = tuple(e for e in ENTRIES if e.list == "promote")

#: fp32-list aten ops with a ``dtype=`` argument: torch runs them with dtype=float32 (an
#: explicit dtype is kept) instead of casting their inputs (its "fp32_set_opt_dtype").
FP32_SET_OPT_DTYPE = frozenset({
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList"})
#: fp32-list aten ops torch redispatches to their ``dtype=float32`` overload ("fp32_append_dtype").
FP32_APPEND_DTYPE = frozenset({"norm.Scalar", "norm.ScalarOpt_dim"})

#: aten ops whose AutocastCUDA kernel only a CUDA (cuDNN) build registers.
CUDA_BUILD_ONLY = frozenset({"_cudnn_rnn"})

_BY_NAME: dict[str, OpEntry] = {}
for _e in ENTRIES + BANNED:
    if _e.name in _BY_NAME:
        raise AssertionError(f"duplicate op table entry {_e.name}")
    _BY_NAME[_e.name] = _e
_INDEX: dict[str, OpEntry] = {}
for _e in ENTRIES + BANNED:
    for _key in (_e.aten + _e.aten_qualified + tuple(a.split(".")[0] for a in _e.aten)
                 + _e.jax + _e.jax_primitives):
        _INDEX.setdefault(_key, _e)
    for _key in _e.torch:  # torch names are shared by a few entries (F.interpolate): first wins
        _INDEX.setdefault(_key, _e)


def entry(name: str) -> OpEntry | None:
    """The entry for ``name``: an entry name, an aten name (``"pow.Tensor_Scalar"``,
    ``"aten::exp"``, ``"pow"``), a torch callable (``"torch.nn.functional.softmax"``), a JAX
    callable (``"jax.numpy.exp"``) or a jaxpr primitive (``"reduce_sum"``).  None when the op
    is on no list."""
    if isinstance(name, OpEntry):
        return name
    return _BY_NAME.get(name) or _INDEX.get(name) or _INDEX.get(name.removeprefix("aten::"))


def op_list(name: str) -> str | None:
    """``"lower"``, ``"fp32"``, ``"promote"`` (or ``"banned"``) for ``name`` (see `entry`);
    None for an op on no list."""
    e = entry(name)
    return None if e is None else e.list


def aten_lists() -> dict[str, str]:
    """``{"aten::exp": "fp32", ...}`` for every aten op of the table (banned included)."""
    return {q: e.list for e in ENTRIES + BANNED for q in e.aten_qualified}


def torch_cast_policy(aten: str) -> str:
    """torch's cast policy for an aten op of the table: "lower_precision_fp", "fp32",
    "fp32_set_opt_dtype", "fp32_append_dtype", "promote" or "banned"."""
    aten = aten.removeprefix("aten::")
    e = _INDEX.get(aten)
    if e is None or aten not in e.aten:
        raise KeyError(f"{aten} is not an aten op of the table")
    if e.list == "lower":
        return "lower_precision_fp"
    if aten in FP32_SET_OPT_DTYPE:
        return "fp32_set_opt_dtype"
    if aten in FP32_APPEND_DTYPE:
        return "fp32_append_dtype"
    return e.list


def _policy_dtypes(policy) -> tuple[str | None, bool]:
    """(compute dtype, autocast on) of a Policy, a policy string, or a bare dtype name."""
    if policy is None:
        return None, False
    if isinstance(policy, str) and policy in _HALF:
        return policy, True
    if isinstance(policy, str):
        from .policy import Policy

        policy = Policy.parse(policy)
    compute = policy.compute_dtype
    return compute, bool(policy.is_mixed and compute in _HALF)


def _promote(dtypes) -> str | None:
    floats = [d for d in dtypes if d in _FLOATS]
    if not floats:
        return None
    widest = max(_WIDTH[d] for d in floats)
    wide = [d for d in floats if _WIDTH[d] == widest]
    if widest == 16 and len(set(wide)) > 1:  # bfloat16 with float16 promotes to float32
        return "float32"
    return wide[0]


def dtype_of(op, policy, input_dtypes) -> str | None:
    """The output dtype of ``op`` (an `OpEntry` or a name `entry` takes; a name on no list
    is fine) under ``policy`` (a Policy, a policy string, or "bfloat16"/"float16" for an
    autocast dtype) for floating inputs of ``input_dtypes`` (dtype names, e.g.
    ``["bfloat16", "float32"]``).  None when no input is floating.

    Mirrors torch's CUDA autocast: float64 inputs are never cast; without autocast (a
    "-true" or float32 policy) and for ops on no list the inputs' type promotion decides.
    """
    dtypes = list(input_dtypes)
    natural = _promote(dtypes)
    if natural is None:
        return None
    e = op if isinstance(op, OpEntry) else entry(op)
    compute, on = _policy_dtypes(policy)
    if not on or compute is None or e is None:
        return natural
    eligible = [d for d in dtypes if d in _FLOATS and d != "float64"]
    if not eligible:
        return natural
    if e.list == "banned":
        raise ValueError(f"{e.name} is refused under CUDA autocast: {e.note}")
    if e.list == "lower":
        return _promote([compute] + [d for d in dtypes if d == "float64"])
    if e.list == "fp32":
        return _promote(["float32"] + [d for d in dtypes if d == "float64"])
    # promote: torch starts from the compute dtype and widens to float32 when a float32
    # operand joins in; another half dtype (bfloat16 under float16) is an error in torch too
    if "float32" in eligible:
        widest = "float32"
    elif all(d == compute for d in eligible):
        widest = compute
    else:
        raise ValueError(f"{e.name}: torch's autocast refuses to promote {sorted(set(eligible))} under a "
                         f"{compute} autocast")
    return _promote([widest] + [d for d in dtypes if d == "float64"])


_RULE = {
    "lower": "operands (bias included) cast to {c}, float32 accumulation, output {c}",
    "fp32": "half operands cast to float32, output float32",
    "promote": "operands cast to the widest input dtype",
    "banned": "refused (torch raises under CUDA autocast)",
}


def table_rows(policy=None) -> list[dict]:
    """The table as the backends apply it under ``policy``: one dict per entry with the
    list, the effective rule and the output dtype for compute-dtype inputs."""
    compute, on = _policy_dtypes(policy) if policy is not None else ("bfloat16", True)
    rows = []
    for e in ENTRIES + BANNED:
        if on:
            rule = _RULE[e.list].format(c=compute)
            out = None if e.list == "banned" else dtype_of(e, compute, [compute])
        else:
            rule, out = "autocast off: inputs' dtype (type promotion)", compute
        rows.append({"name": e.name, "list": e.list, "rule": rule, "output": out,
                     "aten": list(e.aten), "torch": list(e.torch), "jax": list(e.jax),
                     "jax_primitives": list(e.jax_primitives)})
    return rows


def render_table(policy=None, width: int = 100) -> str:
    """Plain-text op table for ``dualprec explain``: per list, its rule under ``policy``, then
    each entry with its aten ops (torch) and its JAX counterparts."""
    import textwrap

    compute, on = _policy_dtypes(policy) if policy is not None else ("bfloat16", True)
    if not on:
        return (f"op table: not applied (no autocast under this policy): every op runs in its inputs' "
                f"dtype, {compute} here")
    lines = [f"op table: torch's CUDA autocast lists, compute dtype {compute}",
             "  torch: plain torch.autocast on CUDA; the same lists emulated under torch.autocast on CPU",
             "  jax: the same lists applied by dualprec_jax's autocast"]
    for kind in LISTS + ("banned",):
        lines.append(f"[{kind}] {_RULE[kind].format(c=compute)}")
        for e in ENTRIES + BANNED:
            if e.list != kind:
                continue
            jax = ", ".join(e.jax_primitives) if e.jax_primitives else ", ".join(e.jax[:2])
            text = f"{e.name}: aten {', '.join(e.aten)}" + (f"; jax {jax}" if jax else "")
            lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ")
    lines.append("[none] every other op (mean, var, std, batch_norm, gelu, silu, add, cat, ...): its inputs' "
                 "dtype, by type promotion")
    return "\n".join(lines)
