"""dualprec_jax.quant at the edges of float32, each against bitsandbytes directly: blocks
whose absmax is huge (its reciprocal is subnormal) or tiny, all-zero partial blocks under
double quantization (subnormal offset and nested absmax), NaN blocks of every size, FP4's
signed zero, and the QLoRA forward of float16/bfloat16 weights computed in float32."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional

from dualprec.ref import fourbit as ref4  # noqa: E402
from dualprec_jax import quant  # noqa: E402


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _both(x, qt, bs, dq=False):
    xt = torch.from_numpy(np.asarray(x, np.float32))
    qb, sb = bnbF.quantize_4bit(xt, blocksize=bs, quant_type=qt, compress_statistics=dq)
    return (qb, sb), quant.quantize_4bit(jnp.asarray(x), qt, bs, dq)


def _assert_same_state(theirs, ours):
    qb, sb = theirs
    assert np.array_equal(np.asarray(ours["weight"]), qb.numpy())
    if sb.nested:
        assert np.array_equal(np.asarray(ours["absmax"]), sb.absmax.numpy())
        assert np.array_equal(bits(ours["nested_absmax"]), bits(sb.state2.absmax.numpy()))
        assert bits(ours["offset"]) == bits(np.float32(sb.offset.item()))
    else:
        assert np.array_equal(bits(ours["absmax"]), bits(sb.absmax.numpy()))


@pytest.mark.parametrize("qt,bs", [("nf4", 64), ("fp4", 64), ("nf4", 1024)])
def test_huge_absmax_blocks_code_like_bitsandbytes(qt, bs):
    """From absmax 2**126 up, 1/absmax is subnormal: XLA would flush it and code every value 0."""
    rng = np.random.default_rng(bs)
    x = rng.standard_normal(3 * bs + 5).astype(np.float32)
    x[:bs] *= np.float32(3e38) / np.abs(x[:bs]).max()      # absmax 3e38
    x[bs: 2 * bs] *= np.float32(2.0 ** 126) / np.abs(x[bs: 2 * bs]).max()  # exactly at the edge
    x[-5:] *= np.float32(1e38)                              # the partial block
    theirs, ours = _both(x, qt, bs)
    _assert_same_state(theirs, ours)
    assert len(set(np.asarray(ours["weight"]).reshape(-1)[: bs // 2].tolist())) > 4  # real codes, not all 0


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_tiny_and_subnormal_blocks_code_like_bitsandbytes(qt):
    x = np.random.default_rng(1).standard_normal(4 * 64).astype(np.float32)
    x[:64] *= np.float32(1e-39)    # subnormal values, subnormal absmax
    x[64:128] *= np.float32(1e-33)  # normal absmax below 2**-100, with subnormal neighbours
    x[70], x[71] = np.float32(3e-39), np.float32(-3e-39)
    theirs, ours = _both(x, qt, 64)
    _assert_same_state(theirs, ours)


def test_fp4_positive_values_that_underflow_keep_code_8():
    """A positive value whose scaled value underflows (or is itself subnormal) is in (0, step/2]:
    bitsandbytes gives it code 8, a flushed zero would give code 0."""
    x = np.zeros(64, np.float32)
    x[0] = 1.0
    x[1:5] = [1e-39, -1e-39, 1e-40, 1e-30]
    theirs, ours = _both(x, "fp4", 64)
    _assert_same_state(theirs, ours)
    assert np.asarray(ours["weight"]).reshape(-1)[:3].tolist() == [(3 << 4) | 8, (0 << 4) | 8, (8 << 4) | 0]


@pytest.mark.parametrize("n,qt", [(5, "nf4"), (100, "fp4"), (193, "nf4"), (64 * 300 + 37, "fp4")])
def test_all_zero_partial_block_under_double_quant(n, qt):
    """The partial block stores absmax 1e-38, so the offset and nested absmax are subnormal
    (~2e-39 for small tensors): stored as bitsandbytes stores them, not flushed to 0."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[n - n % 64 or 0:] = 0
    if n < 300:
        x[:] = 0
    theirs, ours = _both(x, qt, 64, dq=True)
    _assert_same_state(theirs, ours)
    if n < 300:
        assert 0 < float(np.asarray(ours["offset"])) < 1.2e-38  # subnormal, kept


@pytest.mark.parametrize("bs", [64, 512, 1024, 4096])  # from 512 up XLA's max did not always propagate NaN
def test_nan_poisons_its_block_for_every_block_size(bs):
    x = np.random.default_rng(bs).standard_normal(3 * bs).astype(np.float32)
    x[0] = np.nan           # first value of block 0
    x[2 * bs - 1] = np.nan  # last value of block 1
    x[2 * bs + 7] = np.inf  # block 2
    theirs, ours = _both(x, "nf4", bs)
    _assert_same_state(theirs, ours)
    am = np.asarray(ours["absmax"])
    assert np.isnan(am[:2]).all() and np.isinf(am[2])


def test_fp4_code_8_dequantizes_to_negative_zero_like_bitsandbytes():
    """bitsandbytes' dequantize decodes FP4's sign bit: code 8 is -0.0 (its scalar CPU kernel,
    which rows of a length that is not a multiple of 16 take, and its CUDA kernel); its table
    (the checkpoint's quant_map) keeps +0.0, and so does ours."""
    x = np.random.default_rng(0).standard_normal((33, 50)).astype(np.float32) * 1e-3
    x.reshape(-1)[::7] = 1.0
    (qb, sb), ours = _both(x, "fp4", 64)
    codes = np.stack([qb.numpy().reshape(-1) >> 4, qb.numpy().reshape(-1) & 15], -1).reshape(-1)
    assert (codes == 8).sum() > 100
    theirs = bnbF.dequantize_4bit(qb, sb).numpy()
    mine = np.asarray(quant.dequantize_4bit(ours, "fp4", 64, x.shape))
    assert np.array_equal(bits(mine), bits(theirs))
    assert np.signbit(mine.reshape(-1)[codes[: x.size] == 8]).all()
    assert not np.signbit(sb.code.numpy()[8]) and not np.signbit(ref4.CODEBOOKS["fp4"][8])


def _serialization_layer(qt, dq, weight_dtype, bias, seed):
    """A Linear4bit built as bitsandbytes' own test_linear_serialization builds it: a
    torch.nn.Linear(300, 400) in the weight dtype, its weight wrapped in Params4bit, no
    compute dtype (the input's dtype is used)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(300, 400, bias=bias, dtype=weight_dtype)
    layer = bnb.nn.Linear4bit(300, 400, bias=bias, compute_dtype=None, compress_statistics=dq, quant_type=qt,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(data=linear.weight, quant_type=qt, requires_grad=False,
                                     compress_statistics=dq)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias)
    return layer.to("cpu").train()  # the exact path (eval repacks the weight for another kernel)


def _jax_forward(layer, x, qt, dq, weight_dtype):
    sd = {k: v for k, v in layer.state_dict().items()}
    q = {"weight": jnp.asarray(sd["weight"].numpy()), "absmax": jnp.asarray(sd["weight.absmax"].numpy())}
    if dq:
        q["nested_absmax"] = jnp.asarray(sd["weight.nested_absmax"].numpy())
        q["offset"] = jnp.asarray(np.float32(layer.weight.quant_state.offset.item()))
    spec = quant.QuantSpec(f"{qt}-dq" if dq else qt, 64, param_dtype=str(weight_dtype).replace("torch.", ""),
                           compute_dtype="float32")
    bias = None if layer.bias is None else jnp.asarray(layer.bias.detach().float().numpy()).astype(
        {torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16}[weight_dtype])
    return np.asarray(quant.quantized_linear(jnp.asarray(x), q, spec, 400, bias))


@pytest.mark.parametrize("qt,dq,weight_dtype,bias", [
    ("nf4", False, torch.float16, True), ("nf4", True, torch.bfloat16, False),
    ("fp4", True, torch.float16, False), ("fp4", False, torch.bfloat16, True)])
def test_half_weight_qlora_forward_in_float32_equals_bitsandbytes(qt, dq, weight_dtype, bias):
    """float16/bfloat16 weights, float32 compute: bitsandbytes dequantizes straight to float32
    (not through the weight's dtype), and so does the JAX forward.  One-hot inputs make every
    output a single product plus the bias (no summation order), so the check is bit for bit
    on any CPU; random inputs agree within float32 summation error."""
    layer = _serialization_layer(qt, dq, weight_dtype, bias, seed=hash((qt, dq)) % 1000)
    eye = np.eye(300, dtype=np.float32)[::7] * np.float32(1.5)
    with torch.no_grad():
        theirs = layer(torch.from_numpy(eye)).numpy()
    assert theirs.dtype == np.float32
    assert np.array_equal(bits(_jax_forward(layer, eye, qt, dq, weight_dtype)), bits(theirs))
    x = np.random.default_rng(0).random((42, 300), np.float32)  # torch.rand, as bitsandbytes' test
    with torch.no_grad():
        theirs = layer(torch.from_numpy(x)).numpy()
    ours = _jax_forward(layer, x, qt, dq, weight_dtype)
    state32 = copy.copy(layer.weight.quant_state)
    state32.dtype = torch.float32  # what matmul_4bit dequantizes to for a float32 input
    w = bnbF.dequantize_4bit(layer.weight.data, state32).numpy()
    bound = 2 * 300 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w).T) + 1e-30  # both sums' error bounds
    assert (np.abs(ours - theirs) <= bound).all()
    # Rounding the dequantized weight to the storage dtype first (the earlier forward) is
    # visible in the one-hot check: those weights are not bitsandbytes'.
    rounded = np.asarray(jnp.asarray(w).astype(jnp.float16 if weight_dtype == torch.float16 else jnp.bfloat16)
                         .astype(jnp.float32))
    assert not np.array_equal(rounded, w)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_input_gradient_is_cotangent_times_dequantized_weight(compute):
    """The 4-bit product's backward dequantizes the weight again (as bitsandbytes does): a
    one-hot cotangent picks one row of the dequantized weight, bit for bit."""
    import jax

    w = np.random.default_rng(3).standard_normal((48, 128)).astype(np.float32)
    spec = quant.QuantSpec("nf4-dq", 64, compute_dtype=compute)
    q = quant.quantize_4bit(jnp.asarray(w), "nf4", 64, True)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 128)), compute)
    cot = np.zeros((3, 48), np.float32)
    cot[0, 5], cot[1, 0], cot[2, 47] = 1.0, 1.0, 1.0
    dx = jax.jit(jax.grad(lambda x: (quant.quantized_linear(x, q, spec, 48).astype(jnp.float32) * cot).sum()))(x)
    wd = np.asarray(quant.dequantize_4bit(q, "nf4", 64, (48, 128), jnp.dtype(compute)))
    assert dx.dtype == jnp.dtype(compute)
    assert np.array_equal(bits(np.asarray(dx)), bits(wd[[5, 0, 47]]))


@pytest.mark.parametrize("rows,out_f,in_f", [(32, 64, 128), (2, 32, 256), (40, 256, 64)])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_forward_paths_are_the_same_product(rows, out_f, in_f, compute):
    """Every CPU path of the 4-bit product (the fused GEMV, the materialised weight of few-row
    down projections, the bfloat16 GEMM of 16+ rows where the CPU has bfloat16 dot
    instructions, the upcast float32 GEMM): compute-dtype products accumulated in float32 and
    rounded once, so within one rounding plus float32 summation error of the exact product."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    q = quant.quantize_4bit(jnp.asarray(w), "fp4", 64, False)
    x = jnp.asarray(rng.standard_normal((rows, in_f)), compute)
    y = np.asarray(quant.quantized_linear(x, q, quant.QuantSpec("fp4", 64, compute_dtype=compute), out_f),
                   np.float64)
    wd = np.asarray(quant.dequantize_4bit(q, "fp4", 64, (out_f, in_f), jnp.dtype(compute)), np.float64)
    xd = np.asarray(x, np.float64)
    exact, mag = xd @ wd.T, np.abs(xd) @ np.abs(wd).T
    eps = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}[compute]
    assert (np.abs(y - exact) <= eps * np.abs(exact) * 1.0001 + 2 * in_f * 2.0 ** -24 * mag * (1 + eps)).all()


@pytest.mark.parametrize("rows,out_f,in_f", [(1, 64, 256), (3, 32, 512), (20, 128, 128)])
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_row_chunked_product_is_the_dequantized_weight_bit_for_bit(monkeypatch, rows, out_f, in_f, compute):
    """Large weights are dequantized in row chunks (forward: each chunk's output columns;
    backward: the chunks' input gradients summed in float32).  With a tiny chunk size these
    small layers take that path; one-hot inputs and cotangents pick single weights, so the
    forward and the input gradient must equal the dequantized weight bit for bit."""
    import jax

    monkeypatch.setattr(quant, "_CHUNK_BYTES", 2 * in_f * 4)
    assert quant._row_chunks(out_f, in_f, 64, 4) == 2  # the chunked path is the one under test
    w = np.random.default_rng(rows).standard_normal((out_f, in_f)).astype(np.float32)
    q = quant.quantize_4bit(jnp.asarray(w), "fp4", 64, True)
    spec = quant.QuantSpec("fp4-dq", 64, compute_dtype=compute)
    wd = np.asarray(quant.dequantize_4bit(q, "fp4", 64, (out_f, in_f), jnp.dtype(compute)))
    cols = np.random.default_rng(0).integers(0, in_f, rows)
    x = jnp.asarray(np.eye(in_f, dtype=np.float32)[cols], compute)
    fwd = jax.jit(lambda x: quant.quantized_linear(x, q, spec, out_f))
    assert "scan" in str(jax.make_jaxpr(fwd)(x)) or compute == "bfloat16"  # bf16 GEMMs may stay whole
    _assert_same_but_sign_of_zero(np.asarray(fwd(x)), wd[:, cols].T)
    picks = np.random.default_rng(1).integers(0, out_f, rows)
    cot = np.zeros((rows, out_f), np.float32)
    cot[np.arange(rows), picks] = 1.0
    dx = jax.jit(jax.grad(lambda x: (quant.quantized_linear(x, q, spec, out_f).astype(jnp.float32) * cot).sum()))(
        jnp.asarray(np.random.default_rng(2).standard_normal((rows, in_f)), compute))
    _assert_same_but_sign_of_zero(np.asarray(dx), wd[picks])


def _assert_same_but_sign_of_zero(got, want):
    """Bit for bit, except that a zero may have either sign: FP4's code 8 is -0.0, and a
    one-hot product sums it with +-0 products of the other weights (whose sign of zero the
    kernel's summation decides)."""
    zero = want == 0
    assert (got[zero] == 0).all()
    assert np.array_equal(bits(np.where(zero, np.float32(0), got).astype(got.dtype)),
                          bits(np.where(zero, np.float32(0), want).astype(want.dtype)))
