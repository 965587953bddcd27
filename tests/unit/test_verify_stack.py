"""The fused decoder stack over T positions a row (a verify pass's token and drafts) against T
one-position steps: the same bits, for the op alone (left-padded rows, q/k norms, biases) and in
whole models (the batch cache's slot over T positions, across a buffer growth)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlx_cache

import models  # noqa: F401  (BLAS before mlx)
from engine.speculative import BatchKVCache
from models import qkernels
from models.fused_block import fuse_blocks
from models.fused_stack import fuse_stacks
from tests.unit.test_decoder_layer import PROMPTS, merged_batch
from tests.unit.test_fused_block import _on_kernels, _tiny, _weight

pytestmark = pytest.mark.skipif(
    not qkernels.available(), reason=f"mlxd kernels {qkernels.unavailable_reason()}"
)


def _plan(K, F, hq, hk, d, dv, bits, extras):
    shapes = ((hq * d, K), (hk * d, K), (hk * dv, K), (K, hq * dv), (F, K), (F, K), (K, F))
    which = (0, 0, 0, 1, 2, 2, 3)
    projs = [_weight(n, k, bits[w]) for (n, k), w in zip(shapes, which, strict=True)]
    norms = ((1 + 0.3 * mx.random.normal((K,)), 1e-5), (1 + 0.3 * mx.random.normal((K,)), 1e-6))
    qk_norm = (1 + mx.random.normal((d,)), 1 + mx.random.normal((d,)))
    bias = (mx.random.normal((hq * d,)), mx.random.normal((hk * d,)), mx.random.normal((hk * dv,)))
    attn = (hq, d**-0.5, (d - 8 if d > 8 else d, False, 1e4, 1.0))
    opts = (
        qk_norm if extras in ("norms", "both") else None,
        bias if extras in ("bias", "both") else None,
    )
    mx.eval(projs, norms, opts)
    return qkernels.layer_plan(norms, projs, attn, *opts)


@pytest.mark.parametrize(
    "B,T,K,F,hq,hk,d,dv,C,idx,bits,extras,layers",
    [
        (1, 5, 576, 1536, 9, 3, 64, 64, 70, 40, (4, 4, 4, 4), "", 1),  # SmolLM2's layer
        (3, 4, 96, 160, 4, 2, 16, 16, 12, 5, (8, 4, 8, 4), "norms", 2),  # qwen3's q/k norms
        (2, 3, 64, 96, 3, 1, 24, 32, 6, 0, (4, 8, 4, 8), "bias", 3),  # Dv != D, first positions
        (4, 2, 32, 64, 4, 4, 8, 8, 9, 7, (8, 8, 8, 8), "both", 2),  # the buffer's last two
    ],
)
def test_t_positions_give_t_steps_bits(B, T, K, F, hq, hk, d, dv, C, idx, bits, extras, layers):
    mx.random.seed(B * T + K + idx)
    plans = [_plan(K, F, hq, hk, d, dv, bits, extras) for _ in range(layers)]
    x = mx.random.normal((B, T, K))
    keys = [mx.random.normal((B, hk, C, d)) for _ in plans]
    values = [mx.random.normal((B, hk, C, dv)) for _ in plans]
    pad = [min(i % 3, idx) for i in range(B)]  # left padding (row 0's none), before idx
    offset = mx.array([idx - p for p in pad], dtype=mx.int32)
    lp = mx.array(pad)[:, None, None, None]
    mx.eval(x, keys, values, offset)
    # One pass over T positions: each sees its row's keys up to itself, as mlx-lm's causal mask.
    s = mx.arange(idx + T)
    mask = (lp <= s) & (s <= idx + mx.arange(T)[:, None])
    got = qkernels.decoder_stack(plans, x, keys, values, offset, idx, mask)
    assert got is not None
    # T one-position steps, each writing its position into the buffers the last one left.
    ks, vs, off, ys = keys, values, offset, []
    for t in range(T):
        one_mask = lp <= mx.arange(idx + t + 1)
        one = qkernels.decoder_stack(plans, x[:, t : t + 1], ks, vs, off, idx + t, one_mask)
        assert one is not None
        ys.append(one[0])
        off, ks, vs = one[1], one[2::2], one[3::2]
    assert got[0].shape == (B, T, K)
    assert mx.array_equal(got[0], mx.concatenate(ys, axis=1)).item()
    assert got[1].tolist() == off.tolist() == [idx + T - p for p in pad]
    for g, w in zip(got[2:], [a for kv in zip(ks, vs, strict=True) for a in kv], strict=True):
        assert mx.array_equal(g, w).item()


def test_t_positions_it_cannot_take() -> None:
    K = 64
    projs = [_weight(n, k, 4) for n, k in ((64, K), (32, K), (32, K), (K, 64), (96, K), (96, K))]
    projs.append(_weight(K, 96, 4))
    plan = qkernels.layer_plan(
        ((mx.ones((K,)), 1e-5), (mx.ones((K,)), 1e-5)), projs, (4, 0.25, (16, False, 1e4, 1.0))
    )
    keys = mx.zeros((1, 2, 8, 16))
    off = mx.array([2], dtype=mx.int32)

    def stack(x, idx, mask=None, B=1):
        kv = mx.zeros((B, 2, 128, 16))
        o = mx.full((B,), idx, dtype=mx.int32) if B > 1 else off
        k = kv if B > 1 else keys
        return qkernels.decoder_stack([plan], x, [k], [k], o, idx, mask)

    x3 = mx.ones((1, 3, K))
    assert stack(x3, 5) is not None  # positions 5, 6, 7: the buffer's last
    assert stack(x3, 6) is None  # no room for the third: the cache grows
    assert stack(x3, 2, "causal") is None  # no key mask of T rows: the layers' own sequence
    assert stack(x3, 2, mx.ones((1, 1, 1, 3), dtype=mx.bool_)) is None  # one query row
    assert stack(x3, 2, mx.ones((1, 1, 3, 5), dtype=mx.bool_)) is not None
    # From BLAS_ROWS rows on the unfused matmuls go to the BLAS: so does the pass.
    wide = qkernels.BLAS_ROWS // 4
    assert stack(mx.ones((4, wide, K)), 2, B=4) is None
    assert stack(mx.ones((4, wide - 1, K)), 2, B=4) is not None


class _Unfused(BatchKVCache):
    decode_slot = None  # the layers' own sequence with the same cache otherwise


def _run(model, cls, widths: list[int], stream: list[list[int]]) -> list[mx.array]:
    """PROMPTS prefilled alone, merged into a batch cache of `cls`, then `stream`'s tokens fed
    in passes of `widths` positions; each pass's logits [B, W, V]."""
    batch = merged_batch(model, cls, PROMPTS)
    out, at = [], 0
    for w in widths:
        x = mx.array([row[at : at + w] for row in stream], dtype=mx.int32)
        logits = model(x, cache=batch)
        mx.eval(logits)
        out.append(logits)
        at += w
    return out


@pytest.mark.parametrize("kind,bits,fmt", [("llama", 4, "as_stored"), ("qwen3", 4, "as_stored")])
def test_verify_passes_give_one_token_steps_bits(kind, bits, fmt, monkeypatch) -> None:
    """Passes of 1 to 5 positions over 80 tokens a row (the buffers grow past 64 on the way,
    in the slot a pass without room asks for): each position's logits are the one-token
    steps', bit for bit, and the unfused layers' too; the stack ran every pass."""
    widths_seen = []
    ext = qkernels._ext

    class Counting:
        def __getattr__(self, name: str):
            return getattr(ext, name)

        def decoder_stack(self, plans, x, *args):
            widths_seen.append(x.shape[1])
            return ext.decoder_stack(plans, x, *args)

    monkeypatch.setattr(qkernels, "_ext", Counting())
    model = _on_kernels(_tiny(bits, kind), fmt)
    fuse_blocks(model)
    assert fuse_stacks(model) == 1
    mx.random.seed(7)
    stream = mx.random.randint(0, 250, (len(PROMPTS), 80)).tolist()
    widths = [1, 3, 5, 2, 4] * 5 + [1] * 5
    ref = mx.concatenate(_run(model, BatchKVCache, [1] * sum(widths), stream), axis=1)
    assert widths_seen == [1] * sum(widths)
    got = mx.concatenate(_run(model, BatchKVCache, widths, stream), axis=1)
    assert widths_seen[sum(widths) :] == widths  # every pass one op, growing ones too
    assert mx.array_equal(ref, got).item()
    unfused = mx.concatenate(_run(model, _Unfused, widths, stream), axis=1)
    assert mx.array_equal(unfused, got).item()


@pytest.mark.parametrize("held,n", [(5, 60), (64, 1), (60, 70)])
def test_a_slot_without_room_grows_the_buffers_as_mlx_lms_update(held, n) -> None:
    mx.random.seed(held + n)
    k, v = mx.random.normal((2, 3, held, 8)), mx.random.normal((2, 3, held, 4))
    mlx_lms = type("Steps", (mlx_cache.BatchKVCache,), {"step": BatchKVCache.step})
    ours, theirs = BatchKVCache([1, 0]), mlx_lms([1, 0])
    for c in (ours, theirs):
        c.update_and_fetch(k, v)
    slot = ours.decode_slot(n)
    assert slot is not None and slot[3] == held
    theirs.update_and_fetch(mx.zeros((2, 3, n, 8)), mx.zeros((2, 3, n, 4)))
    for a, b in ((slot[0], theirs.keys), (slot[1], theirs.values)):
        assert a.shape == b.shape and mx.array_equal(a, b).item()
    assert mx.array_equal(slot[2], ours.offset).item() and ours.offset.tolist() == [held - 1, held]
