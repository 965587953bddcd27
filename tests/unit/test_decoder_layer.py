"""The fused decoder layer (kernels/decoder.cpp, qkernels.decoder_layer, the batch cache's
fused_update) against the five ops it replaces (attn_in, kv_update, decode_attention, qmm_add,
mlp_residual) on random shapes, and in whole models against the four-op layers: the same bits,
batched equals single."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlx_cache

import models  # noqa: F401  (BLAS before mlx)
from engine.speculative import BatchKVCache, merge
from models import qkernels
from models.fused_block import fuse_blocks
from models.fused_stack import FusedStack, fuse_stacks
from tests.unit.test_fused_block import _on_kernels, _tiny, _weight

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


def _five_ops(x, norms, projs, kv, mask, attn, qk_norm, bias):
    """What the layer computes as the five ops of FusedBlock's four-op path."""
    keys, values, offset, idx = kv
    q, k, v, o, gate, up, down = projs
    heads, scale, rope = attn
    qkv = qkernels.attn_in(
        x, norms[0], q, k, v, offset, (heads, keys.shape[1]), rope, qk_norm, bias
    )
    assert qkv is not None
    new_k, new_v, new_off, kk, vv = qkernels.kv_update(keys, values, offset, qkv[1], qkv[2], idx)
    out = qkernels.decode_attention(qkv[0], kk, vv, scale, mask, flat=True)
    h = qkernels.qmm_add(out, o, x)
    return [qkernels.mlp_residual(h, norms[1], gate, up, down), new_k, new_v, new_off]


@pytest.mark.parametrize(
    "B,K,F,hq,hk,d,dv,C,idx,bits,extras,masked",
    [
        (1, 576, 1536, 9, 3, 64, 64, 70, 40, (4, 4, 4, 4), "", False),  # SmolLM2's layer
        (3, 96, 160, 4, 2, 16, 16, 9, 5, (8, 4, 8, 4), "norms", True),  # qwen3's q/k norms
        (2, 64, 96, 3, 1, 24, 32, 6, 0, (4, 8, 4, 8), "bias", True),  # Dv != D, first position
        (5, 32, 64, 4, 4, 8, 8, 4, 3, (8, 8, 8, 8), "both", True),  # last position of the buffer
    ],
)
def test_decoder_layer_gives_the_five_ops_bits(
    B, K, F, hq, hk, d, dv, C, idx, bits, extras, masked
):
    mx.random.seed(B * K + idx)
    x = mx.random.normal((B, 1, K))
    norms = ((1 + 0.3 * mx.random.normal((K,)), 1e-5), (1 + 0.3 * mx.random.normal((K,)), 1e-6))
    shapes = ((hq * d, K), (hk * d, K), (hk * dv, K), (K, hq * dv), (F, K), (F, K), (K, F))
    which = (0, 0, 0, 1, 2, 2, 3)
    projs = [_weight(n, k, bits[w]) for (n, k), w in zip(shapes, which, strict=True)]
    qk_norm = (1 + mx.random.normal((d,)), 1 + mx.random.normal((d,)))
    bias = (mx.random.normal((hq * d,)), mx.random.normal((hk * d,)), mx.random.normal((hk * dv,)))
    keys, values = mx.random.normal((B, hk, C, d)), mx.random.normal((B, hk, C, dv))
    pad = [i % 3 for i in range(B)]  # left padding (row 0's none)
    offset = mx.array([idx - p for p in pad], dtype=mx.int32)
    mask = mx.array(pad)[:, None, None, None] <= mx.arange(idx + 1) if masked else None
    attn = (hq, d**-0.5, (d - 8 if d > 8 else d, idx % 2 == 1, 1e4, 1.0))
    opts = (
        qk_norm if extras in ("norms", "both") else None,
        bias if extras in ("bias", "both") else None,
    )
    mx.eval(x, keys, values, offset, projs, opts)
    kv = (keys, values, offset, idx)
    plan = qkernels.layer_plan(norms, projs, attn, *opts)
    out = qkernels.decoder_stack([plan], x, [keys], [values], offset, idx, mask)
    assert out is not None
    got = [out[0], out[2], out[3], out[1]]
    want = _five_ops(x, norms, projs, kv, mask, attn, *opts)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert mx.array_equal(g, w).item()
    # The buffers were still held here: copied, the old ones untouched.
    assert mx.array_equal(keys, kv[0]).item() and not mx.array_equal(got[1], keys).item()


def test_decoder_layer_leaves_what_it_cannot_take() -> None:
    K = 64
    projs = [_weight(n, k, 4) for n, k in ((64, K), (32, K), (32, K), (K, 64), (96, K), (96, K))]
    projs.append(_weight(K, 96, 4))
    norms = ((mx.ones((K,)), 1e-5), (mx.ones((K,)), 1e-5))
    keys = mx.zeros((1, 2, 4, 16))
    off = mx.array([2], dtype=mx.int32)
    attn = (4, 0.25, (16, False, 1e4, 1.0))
    x = mx.ones((1, 1, K))
    plan = qkernels.layer_plan(norms, projs, attn)

    def layer(x, kv, mask=None):
        return qkernels.decoder_stack([plan], x, [kv[0]], [kv[1]], kv[2], kv[3], mask)

    assert layer(x, (keys, keys, off, 4)) is None  # no room: the cache grows
    assert layer(x, (keys, keys, off.astype(mx.int64), 2)) is None
    half = keys.astype(mx.float16)
    assert layer(x, (half, half, off, 2)) is None
    assert layer(mx.ones((1, 2, K)), (keys, keys, off, 3)) is None  # no room for the second
    window = mx.ones((1, 1, 1, 2), dtype=mx.bool_)  # not idx + 1 keys
    assert layer(x, (keys, keys, off, 2), window) is None
    assert layer(x, (keys, keys, off, 2), "causal") is not None
    with pytest.raises(ValueError):  # the cache's heads are not the layer's
        layer(x, (mx.zeros((1, 1, 4, 16)), mx.zeros((1, 1, 4, 16)), off, 2))
    # 3 heads do not divide q's 64 rows; o's input size is not Hq * Dv
    assert qkernels.layer_plan(norms, projs, (3, 0.25, (16, False, 1e4, 1.0))) is None
    assert qkernels.layer_plan(norms, [*projs[:3], _weight(K, 96, 4), *projs[4:]], attn) is None
    with pytest.raises(ValueError):
        qkernels._ext.layer_plan([], [4, 4, 4, 4], 1e-5, 1e-5, 4, 16, False, 1e4, 1.0, 0.25)
    assert qkernels.layer_plan(((mx.ones((K,), mx.float16), 1e-5), norms[1]), projs, attn) is None


class _FourOps(BatchKVCache):
    decode_slot = None  # FusedBlock's four-op path with the same cache otherwise


def merged_batch(model, cls, prompts) -> list:
    """Each prompt prefilled alone into caches of its own, merged layer by layer into one
    batch cache of `cls`."""
    per_row = []
    for p in prompts:
        c = [mlx_cache.KVCache() for _ in model.layers]
        model(mx.array([p]), cache=c)
        per_row.append(c)
    return [cls.merge(list(layer)) for layer in zip(*per_row, strict=True)]


def _decode(model, cls, prompts, steps: int, first: int = 1) -> list[mx.array]:
    """Each prompt prefilled alone, merged into a batch cache of `cls`, then greedy steps from
    tokens first, first + 1, ..."""
    batch = merged_batch(model, cls, prompts)
    x, out = mx.arange(first, first + len(prompts))[:, None], []
    for _ in range(steps):
        logits = model(x, cache=batch)[:, -1]
        out.append(logits)
        x = mx.argmax(logits, axis=-1)[:, None]
    return out


PROMPTS = ([5, 9, 30, 2, 7], [11, 3, 250, 4, 8, 60, 1, 99, 42, 17, 6], [77])


@pytest.mark.parametrize(
    "kind,bits,fmt",
    [
        ("llama", 4, "as_stored"),
        ("llama", None, "q8"),
        ("qwen3", 4, "as_stored"),
        ("qwen2", 8, "as_stored"),
    ],
)
@pytest.mark.parametrize("stack", [False, True])
def test_fused_layers_give_the_four_op_bits(kind, bits, fmt, stack, monkeypatch) -> None:
    """Left-padded rows in mlxd's batch cache, 70 greedy steps (the buffers grow past 64
    positions on the way: those steps run the four ops): the one-op layers' (or the one-op
    stack's) logits are the four-op layers' bit for bit, and each row's are what it gets
    decoded alone."""
    calls = []
    ext = qkernels._ext

    class Counting:
        def __getattr__(self, name: str):
            return getattr(ext, name)

        def decoder_stack(self, plans, *args):
            calls.append(len(plans))
            return ext.decoder_stack(plans, *args)

    monkeypatch.setattr(qkernels, "_ext", Counting())
    model = _on_kernels(_tiny(bits, kind), fmt)
    assert fuse_blocks(model) == len(model.layers)
    if stack:
        assert fuse_stacks(model) == 1 and isinstance(model.model, FusedStack)
    steps = 70
    ref = _decode(model, _FourOps, PROMPTS, steps)
    assert not calls
    got = _decode(model, BatchKVCache, PROMPTS, steps)
    for a, b in zip(ref, got, strict=True):
        assert mx.array_equal(a, b).item()
    assert sum(calls) >= (steps - 2) * len(model.layers)
    assert set(calls) == {len(model.layers) if stack else 1}
    for i, p in enumerate(PROMPTS[:2]):
        alone = _decode(model, BatchKVCache, (p,), 8, first=1 + i)
        for a, b in zip(alone, got, strict=False):
            assert mx.array_equal(a[0], b[i]).item()


def test_runner_merge_gives_the_fused_cache() -> None:
    assert type(merge([mlx_cache.KVCache()])) is BatchKVCache
    assert not hasattr(mlx_cache.BatchRotatingKVCache, "fused_update")  # rotating: four ops


def test_the_plan_follows_replaced_weights() -> None:
    """A weight replaced after decoding began (weights loaded into the model) is the one the
    next step uses: the layer's plan is made again."""
    model = _on_kernels(_tiny(4, "llama"), "as_stored")
    fuse_blocks(model)
    assert fuse_stacks(model) == 1
    ref = _on_kernels(_tiny(4, "llama"), "as_stored")
    fuse_blocks(ref)
    _decode(model, BatchKVCache, PROMPTS, 2)  # plans made
    proj = model.layers[1].mlp.down_proj
    proj.scales = proj.scales * 1.5
    ref.layers[1].mlp.down_proj.scales = proj.scales
    got = _decode(model, BatchKVCache, PROMPTS, 3)
    want = _decode(ref, _FourOps, PROMPTS, 3)
    for a, b in zip(got, want, strict=True):
        assert mx.array_equal(a, b).item()


def test_the_stack_writes_the_caches_in_place() -> None:
    """Nothing else holds a cache's buffers between steps: the stack writes them where they
    are (a copy a step would cost more than the layers' weights are worth at one row)."""
    from tests.unit.test_step_kernels import _address

    model = _on_kernels(_tiny(4, "llama"), "as_stored")
    fuse_blocks(model)
    assert fuse_stacks(model) == 1
    per_row = []
    for p in PROMPTS:
        c = [mlx_cache.KVCache() for _ in model.layers]
        model(mx.array([p]), cache=c)
        per_row.append(c)
    batch = [BatchKVCache.merge(list(layer)) for layer in zip(*per_row, strict=True)]
    x, seen = mx.array([[1], [2], [3]]), []
    for _ in range(5):
        x = mx.argmax(model(x, cache=batch)[:, -1], axis=-1)[:, None]
        mx.eval(x)
        seen.append([(_address(c.keys), _address(c.values)) for c in batch])
    # The first steps may copy or grow (the merge's buffers); later ones write where they are.
    assert seen[2] == seen[3] == seen[4]


def test_a_layer_wrapped_after_the_swap_runs_its_wrapper() -> None:
    """A pipeline rank wraps its first layer (models/pipeline.py's receive) after the stack was
    made: the stack must leave such a step to the body's own loop, or the wrapper never runs
    (the two-rank SmolLM2 pipeline hung up on a rank that never received)."""
    import mlx.nn as nn

    class Wrapped(nn.Module):
        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer, self.calls = layer, 0
            self.use_sliding = False  # what the body's own loop reads of a layer

        def __call__(self, x, *args, **kwargs):
            self.calls += 1
            return self.layer(x, *args, **kwargs)

        def _plan(self):  # forwarded, as _Receive forwards every attribute
            return self.layer._plan()

    model = _on_kernels(_tiny(4, "llama"), "as_stored")
    fuse_blocks(model)
    assert fuse_stacks(model) == 1
    wrapper = Wrapped(model.model.layers[0])
    model.model.layers[0] = wrapper
    _decode(model, BatchKVCache, PROMPTS, 3)
    assert wrapper.calls == 1 + 1 + 1 + 3  # three prefills and three decode steps
