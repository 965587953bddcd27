"""The fused decode layer (kernels/layer.cpp, qmm_add, mlp_residual; models/fused_block.py)
against MLX's reference ops on random shapes and odd sizes, and against the unfused layers in
whole models: the same bits, batched equals single."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

import models  # noqa: F401  (BLAS before mlx)
from models import qkernels
from models.fused_block import FusedBlock, fuse_blocks
from models.fused_layers import fuse_for_cpu
from models.fused_mlp import fuse_mlps
from models.quant_layers import quantize_for_cpu
from tests.tiny import batched_greedy_logits

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)
# Integer activations (VNNI and SDOT builds) round x to ~15 bits per 32-value block.
TOL = 1e-3 if qkernels.int_activations() else 1e-4


def _rel_err(got: mx.array, ref: mx.array) -> float:
    return (mx.abs(got - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-6)).item()


def _weight(n: int, k: int, bits: int, sdtype=mx.float16) -> qkernels.Packed:
    w, s, b = mx.quantize(mx.random.normal((n, k)) * 0.2, group_size=32, bits=bits)
    return w, s.astype(sdtype), b.astype(sdtype), bits


def _dense(p: qkernels.Packed) -> mx.array:
    w, s, b, bits = p
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, bits)


@pytest.mark.parametrize(
    "b,k,hq,hk,d,dv,dims,trad,bits,sdtype,biased,normed",
    [
        (1, 576, 9, 3, 64, 64, 64, False, 4, mx.float16, False, False),  # SmolLM2's layer
        (3, 96, 4, 2, 16, 16, 16, True, 8, mx.float32, False, True),  # qwen3's q/k norms
        (2, 64, 3, 1, 24, 40, 16, False, 4, mx.bfloat16, True, True),  # partial RoPE, Dv != D
        (5, 32, 6, 6, 8, 8, 8, False, 8, mx.float16, False, False),
        (2, 896, 14, 2, 64, 64, 64, False, 8, mx.float16, True, False),  # Qwen2.5-0.5B's biases
    ],
)
def test_attn_in_matches_mlx(b, k, hq, hk, d, dv, dims, trad, bits, sdtype, biased, normed):
    mx.random.seed(b + k)
    x = mx.random.normal((b, 1, k))
    nw = mx.random.normal((k,))
    q, kk, v = (
        _weight(hq * d, k, bits, sdtype),
        _weight(hk * d, k, bits, sdtype),
        _weight(hk * dv, k, bits, sdtype),
    )
    bias = (mx.random.normal((hq * d,)), mx.random.normal((hk * d,)), mx.random.normal((hk * dv,)))
    qk_norm = (1 + mx.random.normal((d,)), 1 + mx.random.normal((d,)))
    for offset in (17, mx.array([3 * i + 1 for i in range(b)], dtype=mx.int32)):
        got = qkernels.attn_in(
            x, (nw, 1e-5), q, kk, v, offset, (hq, hk), (dims, trad, 1e4, 0.5),
            qk_norm if normed else None, bias if biased else None,
        )  # fmt: skip
        assert got is not None
        xn = mx.fast.rms_norm(x, nw, 1e-5)
        refs = []
        for i, (p, h, dd, rotate) in enumerate(
            ((q, hq, d, True), (kk, hk, d, True), (v, hk, dv, False))
        ):
            y = xn @ _dense(p).T + (bias[i] if biased else 0)
            y = y.reshape(b, 1, h, dd).transpose(0, 2, 1, 3)
            if rotate and normed:
                y = mx.fast.rms_norm(y, qk_norm[i], 1e-5)
            if rotate:
                y = mx.fast.rope(y, dims, traditional=trad, base=1e4, scale=0.5, offset=offset)
            refs.append(y)
        for g, r in zip(got, refs, strict=True):
            assert g.shape == r.shape and _rel_err(g, r) < TOL


def test_qmm_add_and_mlp_residual_match_mlx() -> None:
    mx.random.seed(1)
    for m, k, f, bits in ((1, 64, 96, 4), (4, 96, 160, 8), (3, 32, 32, 4)):
        x, h = mx.random.normal((m, 1, k)), mx.random.normal((m, 1, k))
        o = _weight(k, k, bits)
        got = qkernels.qmm_add(x, o, h)
        assert _rel_err(got, h + x @ _dense(o).T) < TOL
        g, u, dn = _weight(f, k, bits), _weight(f, k, bits), _weight(k, f, 8)
        nw = mx.random.normal((k,))
        got = qkernels.mlp_residual(h, (nw, 1e-6), g, u, dn)
        n = mx.fast.rms_norm(h, nw, 1e-6)
        ref = h + (nn.silu(n @ _dense(g).T) * (n @ _dense(u).T)) @ _dense(dn).T
        assert got is not None and _rel_err(got, ref) < TOL


def _attn_in(x: mx.array, q: tuple, n_heads: int, n_kv_heads: int, **biases) -> mx.array:
    """attn_in over the same [64, 64] weight for q, k and v (head dim 16)."""
    w = q[:3]
    return qkernels._ext.attn_in(
        x, mx.ones((64,)), 1e-5, *w, *w, *w, 4, mx.array([0]), n_heads, n_kv_heads, 16,
        False, 1e4, 1.0, **biases,
    )  # fmt: skip


def test_kernels_reject_bad_shapes() -> None:
    ext = qkernels._ext
    q = _weight(64, 64, 4)
    with pytest.raises(ValueError):  # heads do not divide the rows
        _attn_in(mx.zeros((1, 1, 64)), q, 3, 1)
    with pytest.raises(ValueError):  # two positions
        _attn_in(mx.zeros((1, 2, 64)), q, 4, 4)
    with pytest.raises(ValueError):  # a q bias alone
        _attn_in(mx.zeros((1, 1, 64)), q, 4, 4, q_bias=mx.zeros((64,)))
    b, short = mx.zeros((64,)), mx.zeros((63,))
    with pytest.raises(ValueError):  # a bias of the wrong size
        _attn_in(mx.zeros((1, 1, 64)), q, 4, 4, q_bias=b, k_bias=b, v_bias=short)
    with pytest.raises(ValueError):
        ext.qmm_add(mx.zeros((1, 64)), *q[:3], 4, mx.zeros((1, 63)))


def _tiny(bits: int | None, kind: str = "llama"):
    from tests.unit.engine_harness import tiny_llama
    from tests.unit.test_fused_attention import _build

    model = tiny_llama() if kind == "llama" else _build(kind)
    for layer in model.layers if kind == "qwen3" else []:
        attn = layer.self_attn  # random q/k norm weights, not ones: a dropped norm would show
        attn.q_norm.weight = 1 + 0.5 * mx.random.normal(attn.q_norm.weight.shape)
        attn.k_norm.weight = 1 + 0.5 * mx.random.normal(attn.k_norm.weight.shape)
    for layer in model.layers if kind == "qwen2" else []:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias = mx.random.normal(proj.bias.shape)  # as large as the projections' outputs
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    return model


def _on_kernels(model, fmt: str):
    quantize_for_cpu(model, fmt)
    fuse_mlps(model)
    fuse_for_cpu(model)
    return model


@pytest.mark.parametrize(
    "kind,bits,fmt,window",
    [
        ("llama", 4, "as_stored", None),
        ("llama", 8, "as_stored", None),
        ("llama", None, "q8", None),
        ("llama", 4, "as_stored", 8),
        ("qwen3", 4, "as_stored", None),  # per-head q/k RMSNorms in attn_in
        ("qwen3", None, "q8", 8),
        ("qwen2", 4, "as_stored", None),  # q/k/v biases in attn_in
        ("qwen2", 8, "as_stored", None),
        ("qwen2", 4, "as_stored", 8),
        ("qwen2", None, "q8", 8),
    ],
)
def test_fused_layers_give_the_unfused_bits(kind, bits, fmt: str, window, monkeypatch) -> None:
    """Left-padded prompts merged into batch caches (rotating ones past their window too), then
    16 greedy decode steps: the fused layers' logits are the unfused kernels' bit for bit (same
    arithmetic, fewer ops), so the tokens are too."""

    calls = []
    ext = qkernels._ext

    class Counting:
        def __getattr__(self, name: str):
            return getattr(ext, name)

        def attn_in(self, *args):
            calls.append(1)
            return ext.attn_in(*args)

    monkeypatch.setattr(qkernels, "_ext", Counting())

    mx.random.seed(0)
    ref = _on_kernels(_tiny(bits, kind), fmt)
    fused = _on_kernels(_tiny(bits, kind), fmt)
    fused.update(ref.parameters())
    assert fuse_blocks(fused) == len(fused.layers)
    assert all(isinstance(layer, FusedBlock) for layer in fused.layers)
    logits = {
        name: batched_greedy_logits(m, 16, window) for name, m in (("ref", ref), ("fused", fused))
    }
    for a, b in zip(logits["ref"], logits["fused"], strict=True):
        assert mx.array_equal(a, b).item()
    # Every decode step of every layer, and the one-token prompt's prefill.
    assert len(calls) == (16 + 1) * len(fused.layers)


def test_layers_the_kernels_cannot_take_are_left_alone() -> None:
    from tests.unit.test_fused_attention import _build

    model = _on_kernels(_build("gemma3"), "q8")  # gemma's own block: fused_gemma.py
    assert fuse_blocks(model) == 0
    model = _on_kernels(_build("qwen2"), "q8")
    del model.layers[0].self_attn.k_proj.bias  # attn_in adds q, k and v biases or none
    model.layers[1].self_attn.o_proj.bias = mx.zeros((64,))  # nor any other projection's
    assert fuse_blocks(model) == 0
    model = _on_kernels(_build("qwen3"), "q8")
    model.layers[0].self_attn.k_norm.eps = 1e-6  # attn_in takes one eps per layer
    assert fuse_blocks(model) == 1
    model = _tiny(None)  # float weights: no kernel-backed projections
    fuse_for_cpu(model)
    assert fuse_blocks(model) == 0


@pytest.mark.parametrize(
    "kind,bits,fmt",
    [
        ("llama", 4, "as_stored"),
        ("llama", 8, "as_stored"),
        ("llama", None, "q8"),
        ("qwen3", 4, "as_stored"),
        ("qwen2", 4, "as_stored"),
        ("qwen2", 8, "as_stored"),
    ],
)
def test_batched_equals_single_with_fused_blocks(kind, bits: int | None, fmt: str) -> None:
    from tests.unit.test_engine_batching import alone_and_batched, prompts

    model = _on_kernels(_tiny(bits, kind), fmt)
    assert fuse_blocks(model) == 2
    alone, batched = alone_and_batched(model, prompts(5, seed=4))
    assert batched == alone


def test_a_stack_op_holds_its_plans_without_python_references() -> None:
    """The decoder stack's op shares its layers' plans with their Python objects in C++ only: a
    Python reference held by the op would be dropped by MLX's stream thread when the op is freed,
    each one taking the GIL there (waiting behind any thread that holds it: a model load's, or
    one synchronizing the streams with it held, a deadlock)."""
    import sys

    model = _on_kernels(_tiny(4), "as_stored")
    fuse_blocks(model)
    plans = [layer._plan() for layer in model.layers]
    assert None not in plans
    attn = model.layers[0].self_attn
    hk, d = attn.n_kv_heads, model.args.hidden_size // model.args.num_attention_heads
    keys = [mx.zeros((1, hk, 8, d)) for _ in plans]
    values = [mx.zeros((1, hk, 8, d)) for _ in plans]
    x = mx.random.normal((1, 1, model.args.hidden_size))
    before = [sys.getrefcount(p) for p in plans]
    out = qkernels.decoder_stack(plans, x, keys, values, mx.array([0], dtype=mx.int32), 0, None)
    assert out is not None
    assert [sys.getrefcount(p) for p in plans] == before  # the lazy op holds no Python reference
    mx.eval(out)
    assert out[0].shape == x.shape
