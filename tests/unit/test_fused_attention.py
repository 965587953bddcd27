"""The fused decode attention (kernels/attention.cpp, models/fused_attention.py) against MLX's
reference SDPA: random shapes, odd sizes, left padding, GQA ratios, rotating windows, mlx-lm's
own batch caches; and the swapped layers in whole models and the engine."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import qwen2, qwen3
from mlx_lm.models.cache import (
    BatchKVCache,
    BatchRotatingKVCache,
    KVCache,
    RotatingKVCache,
)

import models  # noqa: F401  (BLAS before mlx)
from models import qkernels
from models.fused_attention import FusedAttention, fuse_attention
from models.fused_layers import fuse_for_cpu
from tests.tiny import BATCH_PROMPTS, batched_greedy_logits

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


def _sdpa(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _close(got: mx.array, ref: mx.array, tol: float = 1e-5) -> bool:
    err = mx.abs(got - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-6)
    return bool(err.item() < tol)


def _left_pad_mask(pads: list[int], t: int) -> mx.array:
    return (mx.arange(t)[None] >= mx.array(pads)[:, None])[:, None, None, :]


@pytest.mark.parametrize(
    "b,hq,hk,t,d,dv",
    [
        (1, 9, 3, 129, 64, 64),  # SmolLM2's heads
        (3, 4, 1, 300, 16, 16),  # several softmax blocks; one kv head for four
        (2, 6, 6, 7, 17, 17),  # no GQA, odd head size
        (5, 8, 2, 1, 128, 128),  # a single key
        (2, 4, 2, 33, 24, 40),  # value size differs from the key size
        (1, 2, 1, 1000, 80, 80),
    ],
)
def test_matches_sdpa_on_random_shapes(b: int, hq: int, hk: int, t: int, d: int, dv: int) -> None:
    mx.random.seed(b * 100 + t)
    # Views into a larger buffer, as a cache hands its keys over; q as a transposed projection.
    q = mx.random.normal((b, 1, hq, d)).transpose(0, 2, 1, 3)
    k = mx.random.normal((b, hk, t + 9, d))[:, :, :t] * 2
    v = mx.random.normal((b, hk, t + 9, dv))[:, :, :t]
    scale = d**-0.5
    pads = [(3 * i) % t for i in range(b)]
    for mask in (None, _left_pad_mask(pads, t), _left_pad_mask([min(1, t - 1)], t)):
        got = qkernels.decode_attention(q, k, v, scale, mask)
        assert got.shape == (b, hq, 1, dv) and got.dtype == mx.float32
        assert _close(got, _sdpa(q, k, v, scale, mask)), mask is None


def test_masks_of_any_pattern_and_fallbacks() -> None:
    q, k, v = (
        mx.random.normal((3, 4, 1, 32)),
        mx.random.normal((3, 2, 50, 32)),
        mx.random.normal((3, 2, 50, 32)),
    )
    holes = mx.random.uniform(shape=(3, 1, 1, 50)) > 0.5  # a window's gaps, rolled positions
    assert _close(qkernels.decode_attention(q, k, v, 0.3, holes), _sdpa(q, k, v, 0.3, holes))
    # A row with nothing to attend: MLX's masked softmax is uniform over the keys.
    none = mx.concatenate([holes[:2], mx.zeros((1, 1, 1, 50), dtype=mx.bool_)])
    assert _close(qkernels.decode_attention(q, k, v, 0.3, none), _sdpa(q, k, v, 0.3, none))
    assert _close(qkernels.decode_attention(q, k, v, 0.3, "causal"), _sdpa(q, k, v, 0.3, None))
    # Not the kernel's (additive mask, half precision): MLX's own op, same results.
    add = mx.where(holes, 0.0, -1e9).astype(mx.float32)
    assert _close(qkernels.decode_attention(q, k, v, 0.3, add), _sdpa(q, k, v, 0.3, add))
    h = [a.astype(mx.float16) for a in (q, k, v)]
    got = qkernels.decode_attention(*h, 0.3, holes)
    assert got.dtype == mx.float16 and _close(got, _sdpa(*h, 0.3, holes), 1e-3)


def test_rows_get_the_same_bits_alone_or_padded_in_a_batch() -> None:
    q = mx.random.normal((4, 6, 1, 64))
    k, v = mx.random.normal((4, 3, 400, 64)), mx.random.normal((4, 3, 400, 64))
    pads = [0, 5, 131, 17]  # different paddings shift the blocks of a plain loop
    full = qkernels.decode_attention(q, k, v, 0.125, _left_pad_mask(pads, 400))
    for i, p in enumerate(pads):
        alone = qkernels.decode_attention(
            q[i : i + 1], k[i : i + 1, :, p:], v[i : i + 1, :, p:], 0.125, None
        )
        assert mx.array_equal(alone, full[i : i + 1]).item(), i


def _causal_mask(pads: list[int], length: int, t: int) -> mx.array:
    """A batch cache's mask for `length` new positions ending its `t` keys (mlx-lm's own)."""
    from mlx_lm.models.base import create_causal_mask

    return create_causal_mask(length, offset=t - length, left_padding=mx.array(pads))


@pytest.mark.parametrize(
    "b,hq,hk,length,t,d",
    [
        (1, 9, 3, 5, 305, 64),  # SmolLM2's heads, four drafts
        (3, 4, 1, 2, 40, 16),  # one draft, one kv head for four
        (2, 6, 6, 9, 140, 17),  # no GQA, odd head size, a softmax block boundary inside
        (4, 8, 2, 33, 60, 32),  # the most positions a step verifies (32 drafts)
        (2, 2, 1, 3, 3, 8),  # nothing cached before the new positions
    ],
)
def test_a_few_query_positions_match_sdpa(b: int, hq: int, hk: int, length: int, t: int, d: int):
    mx.random.seed(b * 1000 + length)
    q = mx.random.normal((b, length, hq, d)).transpose(0, 2, 1, 3)  # a projection's layout
    k = mx.random.normal((b, hk, t + 5, d))[:, :, :t]
    v = mx.random.normal((b, hk, t + 5, d))[:, :, :t]
    pads = [(7 * i) % max(1, t - length) for i in range(b)]
    mask = _causal_mask(pads, length, t)
    got = qkernels.decode_attention(q, k, v, d**-0.5, mask)
    assert got.shape == (b, hq, length, d)
    assert _close(got, _sdpa(q, k, v, d**-0.5, mask))
    holes = mx.random.uniform(shape=(1, 1, length, t)) > 0.3  # any pattern, broadcast rows
    assert _close(qkernels.decode_attention(q, k, v, 0.2, holes), _sdpa(q, k, v, 0.2, holes))


def test_each_position_gets_the_bits_of_decoding_it_alone() -> None:
    """Verifying drafts computes position i as a decode step over the keys up to it would:
    greedy output with speculation is then the same token for token."""
    b, length, t = 3, 6, 200
    q = mx.random.normal((b, 9, length, 64))
    k, v = mx.random.normal((b, 3, t, 64)), mx.random.normal((b, 3, t, 64))
    pads = [0, 11, 140]
    together = qkernels.decode_attention(q, k, v, 0.125, _causal_mask(pads, length, t))
    for i in range(length):
        end = t - length + i + 1  # the keys position i sees
        alone = qkernels.decode_attention(
            q[:, :, i : i + 1], k[:, :, :end], v[:, :, :end], 0.125, _left_pad_mask(pads, end)
        )
        assert mx.array_equal(alone, together[:, :, i : i + 1]).item(), i


@pytest.mark.parametrize(
    "b,hq,hk,n,prefix,d",
    [
        (1, 9, 3, 82, 0, 64),  # SmolLM2's heads, a short chat prompt
        (2, 4, 2, 33, 50, 16),  # a chunk after a cached prefix
        (3, 6, 6, 7, 0, 17),  # no GQA, odd head size
        (1, 2, 1, 300, 5, 24),  # several softmax blocks
        (2, 4, 2, 1100, 0, 16),  # more positions than one chunk each (4400 units)
    ],
)
def test_prefill_chunks_match_sdpa(b: int, hq: int, hk: int, n: int, prefix: int, d: int) -> None:
    """A prefill chunk (MLX's "causal" mask, aligned to the last key) and the same chunk under a
    boolean mask: SDPA's values; a short chunk's causal flag gives the bits of the explicit mask
    (a long one's runs on the tiled prefill kernel, kernels/attention_prefill.cpp)."""
    mx.random.seed(n + prefix)
    t = prefix + n
    q = mx.random.normal((b, n, hq, d)).transpose(0, 2, 1, 3)
    k = mx.random.normal((b, hk, t + 3, d))[:, :, :t]
    v = mx.random.normal((b, hk, t, d))
    got = qkernels.decode_attention(q, k, v, d**-0.5, "causal")
    assert _close(got, _sdpa(q, k, v, d**-0.5, "causal"))
    mask = _causal_mask([1] * b, n, t)
    padded = qkernels.decode_attention(q, k, v, d**-0.5, mask)
    assert _close(padded, _sdpa(q, k, v, d**-0.5, mask))
    explicit = qkernels.decode_attention(q, k, v, d**-0.5, _causal_mask([0], n, t))
    if n < PREFILL_POSITIONS:
        assert mx.array_equal(got, explicit).item()
    else:
        assert _close(got, explicit)


# kernels/attention_prefill.h's kPrefillPositions: causal chunks this long run in tiles.
PREFILL_POSITIONS = 64


@pytest.mark.parametrize(
    "b,hq,hk,n,prefix,d,dv",
    [
        (1, 9, 3, 64, 0, 64, 64),  # SmolLM2's heads, the shortest tiled chunk
        (1, 9, 3, 1030, 7, 64, 64),  # a long chunk after a prefix, odd tile and block ends
        (2, 4, 1, 97, 3, 256, 256),  # gemma3-270m's heads: four query heads a kv head
        (1, 2, 1, 300, 5, 80, 80),  # value vectors past a pass of four
        (2, 6, 6, 65, 130, 17, 32),  # no GQA, odd key size, values of another size
        (1, 5, 5, 70, 0, 24, 24),  # values of no whole vector on AVX-512: the per-position path
    ],
)
def test_long_prefill_chunks_in_tiles_match_sdpa(b, hq, hk, n, prefix, d, dv) -> None:
    mx.random.seed(n * 7 + d)
    t = prefix + n
    q = mx.random.normal((b, n, hq, d)).transpose(0, 2, 1, 3)  # a projection's layout
    k = mx.random.normal((b, hk, t + 3, d))[:, :, :t] * 2  # a view into a larger cache
    v = mx.random.normal((b, hk, t, dv))
    got = qkernels.decode_attention(q, k, v, d**-0.5, "causal")
    assert got.shape == (b, hq, n, dv)
    assert _close(got, _sdpa(q, k, v, d**-0.5, "causal"))
    # A batch's prompts prefilled together: left-padded rows under the batch cache's mask.
    mask = _causal_mask([(37 * i) % (prefix + 1) for i in range(b)], n, t)
    assert _close(qkernels.decode_attention(q, k, v, d**-0.5, mask), _sdpa(q, k, v, d**-0.5, mask))


def test_long_chunks_under_any_key_mask() -> None:
    """A boolean mask of any pattern (holes, a row that attends nothing: MLX's uniform softmax)
    on a long chunk, with and without the causal flag."""
    mx.random.seed(5)
    q = mx.random.normal((3, 4, 100, 64))
    k, v = mx.random.normal((3, 2, 180, 64)), mx.random.normal((3, 2, 180, 64))
    holes = mx.random.uniform(shape=(3, 1, 100, 180)) > 0.7
    holes = mx.concatenate([holes[:2], mx.zeros((1, 1, 100, 180), dtype=mx.bool_)])
    assert _close(qkernels.decode_attention(q, k, v, 0.125, holes), _sdpa(q, k, v, 0.125, holes))
    causal = holes & _causal_mask([0], 100, 180)
    assert _close(qkernels.decode_attention(q, k, v, 0.125, causal), _sdpa(q, k, v, 0.125, causal))


def test_a_tiled_query_does_not_depend_on_its_chunk() -> None:
    """A position's output is the same bits in any chunk of the same keys that holds it (its
    sums run in blocks counted from the first key, whatever tile it falls in)."""
    mx.random.seed(3)
    q = mx.random.normal((1, 9, 200, 64))
    k, v = mx.random.normal((1, 3, 200, 64)), mx.random.normal((1, 3, 200, 64))
    whole = qkernels.decode_attention(q, k, v, 0.125, "causal")
    # The last 100 positions as their own chunk after a 100-key prefix: other tiles, same keys.
    tail = qkernels.decode_attention(q[:, :, 100:], k, v, 0.125, "causal")
    assert mx.array_equal(whole[:, :, 100:], tail).item()


def test_prefill_on_the_kernel_and_its_edges(monkeypatch) -> None:
    counting = _Counting(qkernels._ext)
    monkeypatch.setattr(qkernels, "_ext", counting)
    q, k = mx.random.normal((1, 2, 40, 16)), mx.random.normal((1, 1, 40, 16))
    assert _close(qkernels.decode_attention(q, k, k, 0.25, None), _sdpa(q, k, k, 0.25, None))
    assert counting.calls == 1
    # Fewer keys than positions under "causal", an additive mask: MLX's SDPA.
    few = k[:, :, :30]
    assert _close(
        qkernels.decode_attention(q, few, few, 0.25, "causal"), _sdpa(q, few, few, 0.25, "causal")
    )
    add = mx.zeros((1, 1, 40, 40))
    assert _close(qkernels.decode_attention(q, k, k, 0.25, add), _sdpa(q, k, k, 0.25, add))
    assert counting.calls == 1
    with pytest.raises(ValueError, match="causal"):
        qkernels._ext.decode_attention(q, few, few, None, 0.25, True)


def _decode_through(batch, hq: int, steps: int, window: int | None = None) -> None:
    """Decode steps through an mlx-lm batch cache (its update_and_fetch and mask): the kernel
    on the cache's own keys, values and mask matches MLX's SDPA at every step."""
    b = batch.offset.shape[0]
    for step in range(steps):
        mask = batch.make_mask(1, window_size=window) if window else batch.make_mask(1)
        kn, vn = mx.random.normal((b, 2, 1, 16)), mx.random.normal((b, 2, 1, 16))
        k, v = batch.update_and_fetch(kn, vn)
        q = mx.random.normal((b, hq, 1, 16))
        ref = _sdpa(q, k, v, 0.25, mask)
        assert _close(qkernels.decode_attention(q, k, v, 0.25, mask), ref), step


def _filled(cache, n: int):
    cache.update_and_fetch(mx.random.normal((1, 2, n, 16)), mx.random.normal((1, 2, n, 16)))
    return cache


def test_on_batch_kv_caches_with_left_padding() -> None:
    batch = BatchKVCache.merge([_filled(KVCache(), n) for n in (5, 40, 17)])
    _decode_through(batch, hq=6, steps=5)
    batch.extend(BatchKVCache.merge([_filled(KVCache(), 3)]))  # a row joins
    _decode_through(batch, hq=6, steps=3)
    batch.filter(mx.array([1, 3]))  # rows leave
    _decode_through(batch, hq=6, steps=3)


def test_on_rotating_caches_past_their_window() -> None:
    rows = [_filled(RotatingKVCache(max_size=12), n) for n in (4, 9, 12)]
    batch = BatchRotatingKVCache.merge(rows)
    _decode_through(batch, hq=4, steps=30, window=12)  # wraps around the window twice
    assert batch.rotated


def _build(kind: str):
    from tests.unit.engine_harness import tiny_gemma3, tiny_llama

    if kind == "llama":
        return tiny_llama()
    if kind == "gemma3":
        return tiny_gemma3(window=8)
    mx.random.seed(0)
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=300,
        tie_word_embeddings=True,
    )
    if kind == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common))
    else:
        model = qwen3.Model(
            qwen3.ModelArgs(
                model_type="qwen3",
                head_dim=16,
                max_position_embeddings=256,
                rope_theta=1e4,
                **common,
            )
        )
    mx.eval(model.parameters())
    return model


class _Counting:
    """The extension module, counting decode_attention calls."""

    def __init__(self, ext):
        self.ext, self.calls = ext, 0

    def __getattr__(self, name: str):
        return getattr(self.ext, name)

    def decode_attention(self, *args):
        self.calls += 1
        return self.ext.decode_attention(*args)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3"])
def test_swapped_layers_give_the_models_logits(kind: str, monkeypatch) -> None:
    """Prompts of different lengths prefill alone, merge into batch caches (left padding), and
    decode past gemma3's window of 8: same logits with the fused layers as with mlx-lm's."""
    counting = _Counting(qkernels._ext)
    monkeypatch.setattr(qkernels, "_ext", counting)
    ref, fused = _build(kind), _build(kind)
    assert fuse_attention(fused) == len(fused.layers)
    assert all(isinstance(layer.self_attn, FusedAttention) for layer in fused.layers)
    assert fused.layers[0].self_attn.n_heads == ref.layers[0].self_attn.n_heads
    tokens = {name: batched_greedy_logits(m, 12) for name, m in (("ref", ref), ("fused", fused))}
    for a, b in zip(tokens["ref"], tokens["fused"], strict=True):
        assert _close(b, a, 1e-4)
    # Every decode step and every prompt's prefill, in every layer.
    assert counting.calls == (12 + len(BATCH_PROMPTS)) * len(fused.layers)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_long_prompts_on_the_tiled_prefill_give_the_models_logits(kind: str) -> None:
    """Prompts long enough for the tiled prefill kernel (gemma3's sliding layers under their
    window's mask), prefilled alone, then decoded in a batch: mlx-lm's logits within 1e-4."""
    long_prompts = (
        [(7 * i) % 290 + 3 for i in range(150)],
        [(11 * i) % 290 + 5 for i in range(70)],
    )
    ref, fused = _build(kind), _build(kind)
    fuse_attention(fused)
    got = batched_greedy_logits(fused, 4, prompts=long_prompts)
    for a, b in zip(batched_greedy_logits(ref, 4, prompts=long_prompts), got, strict=True):
        assert _close(b, a, 1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_batched_equals_single_with_fused_layers(kind: str) -> None:
    from tests.unit.test_engine_batching import alone_and_batched, prompts

    model = _build(kind)
    assert fuse_for_cpu(model) > 0
    alone, batched = alone_and_batched(model, prompts(5, seed=3))
    assert batched == alone


def test_a_nan_key_gives_nan_as_sdpa_does() -> None:
    """A NaN score stays NaN through the kernel's exp (the AVX-512 path clamped it away and
    gave that key weight 0, silently hiding bad values), for the heads that read that key."""
    mx.random.seed(0)
    q = mx.random.normal((1, 4, 1, 64))
    k, v = mx.random.normal((1, 2, 37, 64)), mx.random.normal((1, 2, 37, 64))
    k[0, 0, 5, 3] = float("nan")
    got = mx.isnan(qkernels.decode_attention(q, k, v, 0.125, None)).any(axis=-1)
    ref = mx.isnan(_sdpa(q, k, v, 0.125, None)).any(axis=-1)
    assert got.flatten().tolist() == ref.flatten().tolist() == [True, True, False, False]
