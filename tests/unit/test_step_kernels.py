"""The kernels that shrink a decode step's graph (kernels/embed.cpp, kernels/kv_cache.cpp)
against MLX's own ops: the quantized embedding lookup bit for bit, and the batch KV cache's
one-op update against mlx-lm's BatchKVCache (in place or copied, odd sizes, padded rows)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

import models  # noqa: F401  (BLAS before mlx)
from engine.speculative import BatchKVCache
from models import qkernels
from models.quant_layers import CpuQuantizedEmbedding

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


def _table(n: int, k: int, bits: int, sdtype) -> tuple[mx.array, mx.array, mx.array]:
    w = mx.random.normal((n, k), key=mx.random.key(n * k + bits)) * 4
    q, s, b = mx.quantize(w, group_size=32, bits=bits)
    return q, s.astype(sdtype), b.astype(sdtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sdtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (37, 96), (301, 160)])
def test_embed_rows_equal_mlx_dequantize(bits: int, sdtype, n: int, k: int) -> None:
    q, s, b = _table(n, k, bits, sdtype)
    ids = mx.array([[0, n - 1, n // 2], [n // 3, 0, n - 1]], dtype=mx.int32)
    flat = ids.flatten()
    ref = mx.dequantize(q[flat], s[flat], b[flat], group_size=32, bits=bits)
    got = qkernels.embed_rows(ids, q, s, b, bits)
    assert got is not None and got.dtype == mx.float32 and got.shape == (2, 3, k)
    assert mx.array_equal(got, ref.astype(mx.float32).reshape(2, 3, k)).item()


def test_embed_rows_take_any_integer_ids_and_negative_ones() -> None:
    q, s, b = _table(19, 64, 8, mx.float16)
    ref = mx.dequantize(q, s, b, group_size=32, bits=8).astype(mx.float32)
    for dtype in (mx.int32, mx.uint32, mx.int64, mx.uint64):
        ids = mx.array([3, 18, 0], dtype=dtype)
        assert mx.array_equal(qkernels.embed_rows(ids, q, s, b, 8), ref[mx.array([3, 18, 0])])
    got = qkernels.embed_rows(mx.array([-1, -19]), q, s, b, 8)
    assert mx.array_equal(got, ref[mx.array([18, 0])]).item()
    assert qkernels.embed_rows(mx.array([1.0]), q, s, b, 8) is None  # not ids: MLX's path


def test_quantized_embedding_layer_is_one_op_with_mlx_bits() -> None:
    q, s, b = _table(50, 96, 4, mx.float16)
    layer = CpuQuantizedEmbedding(q, s, b, 4)
    ids = mx.array([[7, 49, 0, 7]])
    ref = mx.dequantize(q[ids[0]], s[ids[0]], b[ids[0]], group_size=32, bits=4)
    assert mx.array_equal(layer(ids), ref.astype(mx.float32)[None]).item()
    with mx.stream(mx.Device(mx.cpu)):
        assert layer(ids).dtype == mx.float32


def _kv(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed))


@pytest.mark.parametrize(("B", "H", "C", "D", "Dv", "idx", "L"), [
    (1, 1, 8, 4, 4, 0, 1), (3, 2, 13, 6, 5, 7, 1), (2, 3, 9, 8, 8, 4, 5), (4, 1, 5, 3, 3, 4, 1),
])  # fmt: skip
def test_kv_update_writes_and_views_as_slice_updates_do(B, H, C, D, Dv, idx, L) -> None:
    keys, values = _kv((B, H, C, D), 1), _kv((B, H, C, Dv), 2)
    k, v = _kv((B, H, L, D), 3), _kv((B, H, L, Dv), 4)
    offset = mx.array(list(range(-2, B - 2)), dtype=mx.int32)
    mx.eval(keys, values, k, v, offset)
    want_k, want_v = mx.array(keys), mx.array(values)
    want_k[..., idx : idx + L, :] = k
    want_v[..., idx : idx + L, :] = v
    out = qkernels.kv_update(keys, values, offset, k, v, idx)
    assert out is not None
    new_k, new_v, new_off, view_k, view_v = out
    assert mx.array_equal(new_k, want_k).item() and mx.array_equal(new_v, want_v).item()
    assert new_off.tolist() == [o + L for o in offset.tolist()]
    assert view_k.shape == (B, H, idx + L, D) and view_v.shape == (B, H, idx + L, Dv)
    assert mx.array_equal(view_k, want_k[..., : idx + L, :]).item()
    assert mx.array_equal(view_v, want_v[..., : idx + L, :]).item()
    # The buffers were still held here (keys, values): copied, the old ones untouched.
    assert not mx.array_equal(keys[..., idx : idx + L, :], k).item()


def test_kv_update_of_a_strided_buffer_and_strided_inputs() -> None:
    big = _kv((2, 2, 12, 6), 5)
    keys, values = big[..., 3:, :], big[..., 3:, :]  # a filtered cache's sliced buffers
    k = _kv((2, 6, 1, 2), 6).transpose(0, 3, 2, 1)  # [2, 2, 1, 6], not row-contiguous
    v = _kv((2, 2, 1, 6), 7)
    offset = mx.array([4, 9], dtype=mx.int32)
    out = qkernels.kv_update(keys, values, offset, k, v, 5)
    assert out is not None
    want_k = mx.array(keys)
    want_k[..., 5:6, :] = k
    assert mx.array_equal(out[0], want_k).item()
    assert mx.array_equal(out[3], want_k[..., :6, :]).item()
    assert mx.array_equal(out[4][..., 5:6, :], v).item()


def test_kv_update_leaves_what_it_cannot_take_to_mlx() -> None:
    keys = mx.zeros((1, 1, 4, 2))
    off = mx.array([0], dtype=mx.int32)
    k = mx.ones((1, 1, 1, 2))
    assert qkernels.kv_update(keys, keys, off, k, k, 4) is None  # no room: the cache grows
    assert qkernels.kv_update(keys, keys, off.astype(mx.int64), k, k, 0) is None
    assert qkernels.kv_update(keys, keys, off, k.astype(mx.float16), k, 0) is None


def _caches(cls, lengths: list[int], seed: int) -> object:
    """A batch cache of rows of these prompt lengths (left padded), as the runner merges it."""
    rows = []
    for i, n in enumerate(lengths):
        c = mlx_cache.KVCache()
        c.update_and_fetch(_kv((1, 2, n, 8), seed + i), _kv((1, 2, n, 8), seed + 50 + i))
        rows.append(c)
    return cls.merge(rows)


def test_batch_cache_decodes_as_mlx_lms_does() -> None:
    ours, theirs = (
        _caches(BatchKVCache, [5, 9, 2], 0),
        _caches(mlx_cache.BatchKVCache, [5, 9, 2], 0),
    )
    assert type(ours) is BatchKVCache
    rows = 3
    for step in range(70):  # past the 64-position growth step
        L = 3 if step == 10 else 1  # a verify pass's few positions
        k, v = _kv((rows, 2, L, 8), 100 + step), _kv((rows, 2, L, 8), 200 + step)
        got, want = ours.update_and_fetch(k, v), theirs.update_and_fetch(k, v)
        mx.eval(got, want)
        assert mx.array_equal(got[0], want[0]).item() and mx.array_equal(got[1], want[1]).item()
        assert ours.offset.tolist() == theirs.offset.tolist() and ours._idx == theirs._idx
        if step == 20:  # a per-row trim and a row leaving, then mlx-lm's cache from that state
            ours.trim_rows([1, 0, 2])
            ours.filter([0, 2])
            theirs, rows = _copy_of(ours), 2
    assert mx.array_equal(ours.make_mask(1), theirs.make_mask(1)).item()


def _copy_of(cache: BatchKVCache) -> mlx_cache.BatchKVCache:
    """mlx-lm's cache in the same state (mlx-lm has no per-row trim to reach it itself)."""
    other = mlx_cache.BatchKVCache([0] * cache.offset.shape[0])
    other.keys, other.values = mx.array(cache.keys), mx.array(cache.values)
    other.offset, other.left_padding, other._idx = cache.offset, cache.left_padding, cache._idx
    return other


def test_batch_cache_update_in_place_keeps_earlier_views_intact() -> None:
    cache = _caches(BatchKVCache, [4, 6], 3)
    k1, v1 = cache.update_and_fetch(_kv((2, 2, 1, 8), 1), _kv((2, 2, 1, 8), 2))
    before = mx.array(k1)
    mx.eval(before)
    cache.update_and_fetch(_kv((2, 2, 1, 8), 3), _kv((2, 2, 1, 8), 4))
    # k1 still views the buffer: the second update must not have written into it.
    assert mx.array_equal(k1, before).item()


def _address(a: mx.array) -> int:
    view = np.asarray(a)  # the buffer protocol: no copy
    return int(view.__array_interface__["data"][0])


def test_batch_cache_updates_in_place_when_nothing_else_holds_the_buffer() -> None:
    cache = _caches(BatchKVCache, [4, 6], 5)
    addresses = []
    for step in range(4):
        k, v = cache.update_and_fetch(_kv((2, 2, 1, 8), step), _kv((2, 2, 1, 8), 10 + step))
        mx.eval(k, v)
        del k, v
        addresses.append(_address(cache.keys))
    # The first update may copy (the merge's buffer); later ones write where it already is.
    assert len(set(addresses[1:])) == 1


def test_batch_cache_one_position_mask_is_mlx_lms() -> None:
    ours, theirs = (
        _caches(BatchKVCache, [3, 7, 1], 9),
        _caches(mlx_cache.BatchKVCache, [3, 7, 1], 9),
    )
    for n in (1, 4):  # one position (the fast path) and a verify pass's few (mlx-lm's own)
        got, want = ours.make_mask(n), theirs.make_mask(n)
        assert got.shape == want.shape and mx.array_equal(got, want).item()
    assert ours.make_mask(1, window_size=4).shape == theirs.make_mask(1, window_size=4).shape


@pytest.mark.parametrize(("B", "Hq", "Hk", "T", "D"), [(1, 3, 1, 5, 8), (3, 9, 3, 17, 6)])
def test_flat_decode_attention_is_the_reshaped_output(B, Hq, Hk, T, D) -> None:
    q, k, v = _kv((B, Hq, 1, D), 1), _kv((B, Hk, T, D), 2), _kv((B, Hk, T, D), 3)
    mask = mx.arange(T)[None, None, None, :] >= mx.array([0, 2, 1][:B])[:, None, None, None]
    for m in (None, mask):
        want = qkernels.decode_attention(q, k, v, 0.3, m).reshape(B, 1, Hq * D)
        got = qkernels.decode_attention(q, k, v, 0.3, m, flat=True)
        assert got.shape == (B, 1, Hq * D) and mx.array_equal(got, want).item()
    with mx.stream(mx.Device(mx.cpu)):  # MLX's SDPA where the kernel does not run
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask.astype(mx.int32))
    got = qkernels.decode_attention(q, k, v, 0.3, mask.astype(mx.int32), flat=True)
    assert mx.allclose(got, ref.reshape(B, 1, -1)).item()
