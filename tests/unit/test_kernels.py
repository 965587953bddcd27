"""mlxd's CPU kernels (kernels/, models/qkernels.py) against MLX's reference ops, and the
kernel-backed layers in a model: same logits as dequantized weights, batched equals single."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.activations import swiglu

import models  # noqa: F401  (BLAS before mlx)
from models import qkernels
from models.quant_layers import CpuQuantizedEmbedding, CpuQuantizedLinear, quantize_for_cpu

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


def _rel_err(got: mx.array, ref: mx.array) -> float:
    return (mx.linalg.norm(got - ref) / mx.maximum(mx.linalg.norm(ref), 1e-6)).item()


def _reference(x: mx.array, w: mx.array, s: mx.array, b: mx.array, bits: int) -> mx.array:
    s, b = s.astype(mx.float32), b.astype(mx.float32)  # a float16 dequantize would round
    dense = mx.dequantize(w, s, b, group_size=32, bits=bits)
    return x.astype(mx.float32) @ dense.T


# VNNI and SDOT builds multiply integer activations (~15 bits per 32-value block: qdot_i8.h).
INT_ACTS = qkernels.int_activations()
TOL = 1e-4 if INT_ACTS else 1e-5


def _int_acts_reference(x: mx.array, w: mx.array, s: mx.array, b: mx.array, bits: int):
    """What the VNNI kernel computes: x rounded per block to step / 256 * (256 * q1 + q2) times
    the centered weights (q - c) * s, plus each block's exact sum of x times b + c * s."""
    s, b = s.astype(mx.float32), b.astype(mx.float32)
    xb = x.reshape(*x.shape[:-1], -1, 32)
    amax = mx.abs(xb).max(-1, keepdims=True)
    inv = mx.where(amax > 1e-30, 127.0 / amax, 0.0)
    step = amax / 127.0
    q1 = mx.round(xb * inv)
    q2 = mx.clip(mx.round((xb - q1 * step) * (inv * 256.0)), -128, 127)
    xt = ((256.0 * q1 + q2) * (step / 256.0)).reshape(x.shape)
    c = 2 ** (bits - 1)
    centered = mx.dequantize(w, s, -c * s, group_size=32, bits=bits)
    return xt @ centered.T + xb.sum(-1) @ (b + c * s).T


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sdtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize(
    "n,k", [(1, 32), (7, 96), (5, 480), (33, 576), (9, 800), (577, 1536), (1536, 576)]
)
def test_qmm_matches_dequantized_matmul(bits: int, sdtype, n: int, k: int) -> None:
    mx.random.seed(n * 7 + k + bits)
    w, s, b = mx.quantize(mx.random.normal((n, k)) * 0.1, group_size=32, bits=bits)
    s, b = s.astype(sdtype), b.astype(sdtype)
    for m in (1, 2, 3, 4, 5, 8, 15, 16, 17, 33, 70, 100):  # 100: dequantize + BLAS
        x = mx.random.normal((m, k))
        got = qkernels.qmm(x, w, s, b, bits)
        assert got.shape == (m, n) and got.dtype == mx.float32
        # The fp32 product with the dequantized weights, up to float (or x's ~15-bit) rounding.
        assert _rel_err(got, _reference(x, w, s, b, bits)) < TOL, (m, n, k)
        if INT_ACTS and m < qkernels.BLAS_ROWS:
            assert _rel_err(got, _int_acts_reference(x, w, s, b, bits)) < 1e-5, (m, n, k)


def test_qmm_blocks_of_zeros_and_extreme_scales() -> None:
    w, s, b = mx.quantize(mx.random.normal((40, 128)), group_size=32, bits=4)
    x = mx.random.normal((3, 128)) * mx.array([0.0] * 32 + [1e-6] * 32 + [1e4] * 32 + [1.0] * 32)
    got = qkernels.qmm(x, w, s, b, 4)
    assert mx.all(mx.isfinite(got)).item()
    assert _rel_err(got, _reference(x, w, s, b, 4)) < TOL


def test_rows_are_independent_of_the_batch() -> None:
    """Each row's result is bit-identical alone or in any batch (batched equals single)."""
    w, s, b = mx.quantize(mx.random.normal((300, 192)), group_size=32, bits=4)
    x = mx.random.normal((33, 192))
    full = qkernels.qmm(x, w, s, b, 4)
    for i in (0, 5, 32):
        assert mx.array_equal(qkernels.qmm(x[i : i + 1], w, s, b, 4), full[i : i + 1]).item()
    assert mx.array_equal(qkernels.qmm(x[4:9], w, s, b, 4), full[4:9]).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sdtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("n,k", [(1, 256), (3, 480), (33, 800), (130, 576)])
def test_rows_are_independent_of_the_batch_on_odd_shapes(bits: int, sdtype, n: int, k: int) -> None:
    """Full 8-block passes, a tail of 1-7 blocks and every tile height (1-8 rows, then the
    rest): a row gives the same bits alone as in any batch."""
    mx.random.seed(n + k + bits)
    w, s, b = mx.quantize(mx.random.normal((n, k)) * 0.1, group_size=32, bits=bits)
    s, b = s.astype(sdtype), b.astype(sdtype)
    x = mx.random.normal((19, k))
    full = qkernels.qmm(x, w, s, b, bits)
    assert _rel_err(full, _reference(x, w, s, b, bits)) < TOL
    for i0, i1 in ((0, 1), (18, 19), (3, 10), (1, 18), (2, 5)):
        assert mx.array_equal(qkernels.qmm(x[i0:i1], w, s, b, bits), full[i0:i1]).item(), (i0, i1)


def test_dequantize_matches_mlx() -> None:
    from models.qkernels import _ext

    for bits in (4, 8):
        w, s, b = mx.quantize(mx.random.normal((33, 96)), group_size=32, bits=bits)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        ref = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, bits)
        assert mx.allclose(_ext.dequantize(w, s, b, bits), ref, atol=1e-6).item()


def test_qmm_strided_and_batched_inputs() -> None:
    w, s, b = mx.quantize(mx.random.normal((40, 64)), group_size=32, bits=8)
    x3 = mx.random.normal((2, 3, 64))
    ref = _reference(x3, w, s, b, 8)
    assert qkernels.qmm(x3, w, s, b, 8).shape == (2, 3, 40)
    assert _rel_err(qkernels.qmm(x3, w, s, b, 8), ref) < 0.01
    xt = mx.random.normal((64, 5)).T  # a transposed (column-major) view
    assert _rel_err(qkernels.qmm(xt, w, s, b, 8), _reference(xt, w, s, b, 8)) < 0.01
    half = qkernels.qmm(x3.astype(mx.float16), w, s, b, 8)
    assert half.dtype == mx.float32 and _rel_err(half, ref) < 0.01


def test_qmm_rejects_bad_shapes() -> None:
    w, s, b = mx.quantize(mx.random.normal((8, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError):
        qkernels.qmm(mx.zeros((1, 32)), w, s, b, 4)
    with pytest.raises(ValueError):
        qkernels.qmm(mx.zeros((1, 64)), w, s, b, 3)


def test_layers_match_mlx_quantized_layers() -> None:
    lin = nn.QuantizedLinear(96, 50, bias=True, group_size=32, bits=4)
    lin.bias = mx.random.normal((50,))
    ours = CpuQuantizedLinear(lin.weight, lin.scales, lin.biases, 4, lin.bias)
    x = mx.random.normal((3, 96))
    assert _rel_err(ours(x), lin(x)) < 0.01
    emb = nn.QuantizedEmbedding(70, 64, group_size=32, bits=8)
    qemb = CpuQuantizedEmbedding(emb.weight, emb.scales, emb.biases, 8)
    ids = mx.array([[1, 5, 69]])
    assert qemb(ids).dtype == mx.float32 and mx.allclose(qemb(ids), emb(ids), atol=1e-3).item()
    h = mx.random.normal((2, 64))
    assert _rel_err(qemb.as_linear(h), emb.as_linear(h)) < 0.01


def _tiny(bits: int | None):
    from tests.unit.engine_harness import tiny_llama

    model = tiny_llama()
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    return model


@pytest.mark.parametrize(
    "bits,fmt,want",
    [(4, "as_stored", 4), (8, "as_stored", 8), (None, "as_stored", 8), (4, "q8", 8)],
)
def test_model_on_kernels_matches_reference(bits: int | None, fmt: str, want: int) -> None:
    """A tiny llama: its logits on the kernels match MLX's on the same weights; "as_stored"
    keeps the bits it can and makes float weights 8-bit, "q8" makes every matmul weight 8-bit
    (the untied lm_head and the embeddings too)."""
    model = _tiny(bits)
    ids = mx.array([[3, 17, 42, 7, 99, 5]])
    ref = model(ids)
    assert quantize_for_cpu(model, fmt) == 16  # 2 layers x 7, the lm_head and the embeddings
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, CpuQuantizedLinear) and layer.bits == want
    assert isinstance(model.model.embed_tokens, CpuQuantizedEmbedding)
    # Exact for weights kept as stored; requantizing to 8 bits moves them a little.
    assert _rel_err(model(ids), ref) < (1e-4 if bits == want else 0.05)
    assert (mx.argmax(model(ids), -1) == mx.argmax(ref, -1)).all().item()


def _mlp(k: int, f: int, d: int, gu_bits: int, down_bits: int, sdtype) -> nn.Module:
    def lin(n: int, kk: int, bits: int) -> CpuQuantizedLinear:
        w, s, b = mx.quantize(mx.random.normal((n, kk)) * 0.1, group_size=32, bits=bits)
        return CpuQuantizedLinear(w, s.astype(sdtype), b.astype(sdtype), bits)

    class Mlp(nn.Module):  # mlx-lm's llama MLP, as fuse_mlps recognizes it
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = lin(f, k, gu_bits), lin(f, k, gu_bits)
            self.down_proj = lin(d, f, down_bits)

        def __call__(self, x: mx.array) -> mx.array:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return Mlp()


@pytest.mark.parametrize(
    "k,f,d,gu_bits,down_bits,sdtype",
    [
        (64, 96, 64, 4, 4, mx.float16),
        (96, 160, 32, 8, 4, mx.float32),
        (576, 1536, 576, 4, 8, mx.bfloat16),
        (32, 33 * 32, 7, 4, 4, mx.float16),  # F not a multiple of the chunk or the lanes
    ],
)
def test_fused_mlp_matches_unfused(k, f, d, gu_bits, down_bits, sdtype) -> None:
    from models.fused_mlp import FusedMLP, fuse_mlps

    mx.random.seed(k + f + d)
    parent = nn.Module()
    parent.mlp = _mlp(k, f, d, gu_bits, down_bits, sdtype)
    ref_mlp = parent.mlp
    assert fuse_mlps(parent) == 1 and isinstance(parent.mlp, FusedMLP)
    for m in (1, 3, 8, 17, 70):  # 70: prefill-sized, the unfused ops
        x = mx.random.normal((m, k))
        got = parent.mlp(x)
        assert got.shape == (m, d) and got.dtype == mx.float32
        assert _rel_err(got, ref_mlp(x)) < 1e-4, (m, k, f, d)
    x = mx.random.normal((2, 9, k))
    whole = parent.mlp(x)
    assert whole.shape == (2, 9, d)
    assert mx.array_equal(parent.mlp(x[1:, 4:5]), whole[1:, 4:5]).item()  # batched equals single


def test_fused_mlp_runs_swapped_projections_as_they_are() -> None:
    """Sharding swaps projections after the fusion (down_proj inside an all_sum): those run."""
    from models.fused_mlp import fuse_mlps

    class Doubled(nn.Module):  # stands in for a wrapper such as sharding's SumAcross
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, x: mx.array) -> mx.array:
            return 2 * self.inner(x)

    parent = nn.Module()
    parent.mlp = _mlp(64, 96, 64, 4, 4, mx.float16)
    x = mx.random.normal((2, 64))
    ref = parent.mlp(x)
    assert fuse_mlps(parent) == 1
    parent.mlp.down_proj = Doubled(parent.mlp.down_proj)
    assert _rel_err(parent.mlp(x), 2 * ref) < 1e-4


def test_fused_mlp_rejects_mismatched_weights() -> None:
    from models.qkernels import _ext

    assert _ext is not None
    g = mx.quantize(mx.random.normal((64, 64)), group_size=32, bits=4)
    u = mx.quantize(mx.random.normal((32, 64)), group_size=32, bits=4)
    d = mx.quantize(mx.random.normal((64, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError):
        _ext.mlp(mx.zeros((1, 64)), *g, *u, 4, *d, 4)


@pytest.mark.parametrize("bits,fmt", [(4, "as_stored"), (8, "as_stored"), (None, "q8")])
def test_batched_equals_single_on_kernels(bits: int | None, fmt: str) -> None:
    from models.fused_mlp import fuse_mlps
    from tests.unit.engine_harness import Harness
    from tests.unit.test_engine_batching import greedy, prompts

    model = _tiny(bits)
    quantize_for_cpu(model, fmt)
    assert fuse_mlps(model) == 2
    ps = prompts(5)
    alone = {}
    for i, p in enumerate(ps):
        alone.update(Harness(model).run([greedy(i, p)]))
    assert Harness(model).run([greedy(i, p) for i, p in enumerate(ps)], every=3) == alone


@pytest.mark.parametrize("traditional,dims", [(False, 64), (True, 64), (False, 32)])
def test_rope_matches_mlx(traditional: bool, dims: int) -> None:
    from models.fused_layers import FastRoPE

    ref = nn.RoPE(dims, traditional=traditional, base=100000.0, scale=0.5)
    ours = FastRoPE(ref)
    for b, h, length, offset in [
        (1, 9, 1, 100),
        (3, 2, 1, mx.array([5, 100, 0])),  # per-row offsets: left-padded batch caches
        (2, 3, 17, 0),
        (2, 3, 5, mx.array(3)),
    ]:
        # [B, L, H, D] transposed to [B, H, L, D], as attention layers hand it over
        x = mx.random.normal((b, length, h, 64)).transpose(0, 2, 1, 3)
        got = ours(x, offset)
        assert got.shape == x.shape
        assert mx.allclose(got, ref(x, offset), atol=1e-4).item(), (b, h, length)


def test_rms_norm_matches_mlx() -> None:
    from models.fused_layers import FastRMSNorm

    ref = nn.RMSNorm(96, eps=1e-5)
    ref.weight = mx.random.normal((96,))
    ours = FastRMSNorm(ref)
    for x in (mx.random.normal((3, 1, 96)), mx.random.normal((96, 5)).T, mx.zeros((1, 96))):
        assert mx.allclose(ours(x), ref(x), atol=1e-5).item()
    half = mx.random.normal((2, 96)).astype(mx.float16)  # not the kernel's: MLX's op
    assert mx.allclose(ours(half), ref(half), atol=1e-2).item()


def test_swiglu_matches_mlx() -> None:
    """The prefill SwiGLU kernel (any size: vector body and scalar tail, several pool chunks,
    strided views) against mlx-lm's swiglu; extreme gates stay finite as MLX's do."""
    from models.cpu_layout import fast_swiglu

    mx.random.seed(7)
    shapes = [(1, 1, 7), (1, 83, 1536), (2, 37, 1000), (40000,)]
    for shape in shapes:
        g, u = 4 * mx.random.normal(shape), mx.random.normal(shape)
        got = qkernels.swiglu(g, u)
        assert got is not None and got.shape == g.shape
        assert mx.allclose(got, swiglu(g, u), rtol=1e-5, atol=1e-6).item(), shape
    g = mx.random.normal((96, 5)).T  # a transposed view
    assert mx.allclose(fast_swiglu(g, g), swiglu(g, g), rtol=1e-5, atol=1e-6).item()
    edge = mx.array([-200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0] * 3)
    ref = swiglu(edge, mx.ones_like(edge))
    assert mx.allclose(qkernels.swiglu(edge, mx.ones_like(edge)), ref, atol=1e-6).item()
    assert qkernels.swiglu(g.astype(mx.float16), g.astype(mx.float16)) is None  # MLX's ops
    with pytest.raises(ValueError, match="one shape"):
        qkernels._ext.swiglu(mx.zeros((2, 3)), mx.zeros((3, 2)))


def _decode_perplexity(lm, text: str) -> float:
    """Perplexity fed 8 tokens at a time through a KV cache: decode-sized matmuls, the kernels'
    path (test_models_gguf's perplexity is one prefill, which goes through the BLAS)."""
    import math

    from mlx_lm.models.cache import make_prompt_cache

    ids = lm.tokenizer.encode(text)
    cache = make_prompt_cache(lm.model)
    nll = 0.0
    for i in range(0, len(ids) - 1, 8):
        x = mx.array([ids[i : min(i + 8, len(ids) - 1)]])
        logits = lm.model(x, cache=cache).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array([ids[i + 1 : i + 1 + x.shape[1]]])[..., None]
        nll -= mx.take_along_axis(logp, target, axis=-1).sum().item()
    return math.exp(nll / (len(ids) - 1))


def _greedy_answer(lm, question: str, n: int = 8) -> str:
    from mlx_lm.models.cache import make_prompt_cache

    tok = lm.tokenizer
    x = mx.array([tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))])
    cache, out = make_prompt_cache(lm.model), []
    for _ in range(n):
        t = int(mx.argmax(lm.model(x, cache=cache)[:, -1, :], axis=-1).item())
        out.append(t)
        x = mx.array([[t]])
    return tok.decode(out)


def test_smollm2_on_the_decode_kernels(smollm2_dir) -> None:
    """SmolLM2 Q4_1 as stored through the decode kernels (integer activations on VNNI builds,
    the fused MLP): perplexity within 2% of fp32's, and the France question answers Paris (a
    near tie for the first token: fp32's margin is 0.08 logits)."""
    from models.loader import load_model
    from tests.unit.test_models_gguf import TEXT

    fp32 = load_model(smollm2_dir, "smollm2:135m", "fp32")
    ref = _decode_perplexity(fp32, TEXT)
    del fp32
    lm = load_model(smollm2_dir, "smollm2:135m", "as_stored")
    assert abs(_decode_perplexity(lm, TEXT) / ref - 1) < 0.02
    assert "Paris" in _greedy_answer(lm, "What is the capital of France?")
