"""MLX's buffer cache bounded by what a step needs and given back when idle; the step estimate."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import pytest

from engine.memory import MIN_CACHE_LIMIT, MemoryGovernor
from models.memory import prefill_activation_bytes, step_activation_bytes

SMOLLM2 = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
}


@pytest.fixture(autouse=True)
def _cache_limit() -> Iterator[None]:
    """The governors here set MLX's process-wide cache limit: put it back after each test."""
    old = mx.set_cache_limit(0)
    mx.set_cache_limit(old)
    yield
    mx.set_cache_limit(old)


def test_step_estimate_is_one_layer_of_the_chunk_plus_the_logits() -> None:
    per_token = 4 * 576 + 3 * 1536 + (9 + 2 * 3) * 64
    assert step_activation_bytes(SMOLLM2, 2048, 32) == 4 * 2048 * per_token + 12 * 32 * 49152
    # Layers run in turn and reuse each other's buffers: depth does not add.
    assert step_activation_bytes({**SMOLLM2, "num_hidden_layers": 60}, 2048, 32) == (
        step_activation_bytes(SMOLLM2, 2048, 32)
    )
    nested = {"text_config": SMOLLM2, "model_type": "gemma3"}
    assert step_activation_bytes(nested, 16, 4) == step_activation_bytes(SMOLLM2, 16, 4)


@pytest.mark.parametrize("rows,width", [(1, 64), (4, 128), (16, 128), (2, 512)])
def test_prefill_estimate_matches_what_mlx_allocates(rows: int, width: int) -> None:
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    cfg = {**SMOLLM2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8}
    cfg.update(num_key_value_heads=2, head_dim=32, vocab_size=512, num_hidden_layers=2)
    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=True, **cfg)
    model = llama.Model(args)
    mx.eval(model.parameters())
    caches = make_prompt_cache(model)
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model(mx.zeros((rows, width), dtype=mx.int32), cache=caches)  # KV only, as prefills run
    kv = [a for c in caches for a in (c.keys, c.values)]
    mx.eval(kv)
    transient = mx.get_peak_memory() - before - sum(a.nbytes for a in kv)
    estimate = prefill_activation_bytes(cfg, rows, width, width)
    assert 0.8 * transient <= estimate <= 1.5 * transient


def test_the_cache_limit_follows_the_models_within_floor_and_ceiling() -> None:
    g = MemoryGovernor(cache_limit=0, idle_release=1.0, ceiling=1 << 30)
    g.set_step_bytes(0)
    assert g.cache_limit == MIN_CACHE_LIMIT
    g.set_step_bytes(300 << 20)
    assert g.cache_limit == 300 << 20
    assert mx.set_cache_limit(300 << 20) == 300 << 20  # MLX was told
    g.set_step_bytes(5 << 30)
    assert g.cache_limit == 1 << 30
    fixed = MemoryGovernor(cache_limit=123 << 20, idle_release=1.0, ceiling=1 << 30)
    fixed.set_step_bytes(5 << 30)
    assert fixed.cache_limit == 123 << 20


def test_the_cache_limit_is_a_prompt_chunks_while_prefilling_else_a_decode_steps() -> None:
    g = MemoryGovernor(cache_limit=0, idle_release=1.0, ceiling=1 << 30)
    g.set_step_bytes(300 << 20, 40 << 20)
    assert g.cache_limit == 300 << 20  # before the first step: prompts come first
    a = mx.ones((25 << 20,))  # 100 MB freed into the cache
    mx.eval(a)
    del a
    assert mx.get_cache_memory() >= 100 << 20
    g.prefilling(False)
    assert g.cache_limit == 40 << 20 and mx.get_cache_memory() <= 40 << 20
    g.prefilling(True)
    assert g.cache_limit == 300 << 20
    g.set_step_bytes(300 << 20)  # no decode figure: one limit
    g.prefilling(False)
    assert g.cache_limit == 300 << 20


def test_idle_release_empties_the_cache_once_per_idle_spell() -> None:
    g = MemoryGovernor(cache_limit=256 << 20, idle_release=0.0, ceiling=1 << 30)
    g.set_step_bytes(0)
    g.busy()
    a = mx.ones((1 << 20,))
    mx.eval(a)
    del a
    assert mx.get_cache_memory() >= 4 << 20  # the freed buffer is kept for reuse
    assert g.tick()
    assert mx.get_cache_memory() == 0 and g.releases == 1
    assert not g.tick()  # nothing ran since: nothing to release again
    g.busy()
    assert g.tick() and g.releases == 2
    report = g.report()
    assert report.rss_bytes > 0 and report.mlx_cache_bytes == 0 and report.memory_releases == 2


def test_no_release_before_the_idle_time_or_when_disabled() -> None:
    waiting = MemoryGovernor(cache_limit=0, idle_release=3600.0, ceiling=1 << 30)
    waiting.busy()
    assert not waiting.tick()
    never = MemoryGovernor(cache_limit=0, idle_release=-1.0, ceiling=1 << 30)
    never.busy()
    assert not never.tick() and never.releases == 0


def test_prefills_the_kernels_hand_to_the_blas_count_two_layers_of_float32_weights() -> None:
    layer = 4 * (576 * (2 * 9 + 2 * 3) * 64 + 3 * 576 * 1536)
    plain = [prefill_activation_bytes(SMOLLM2, 1, w, w) for w in (95, 96)]
    on_kernels = [prefill_activation_bytes(SMOLLM2, 1, w, w, dequantized_from=96) for w in (95, 96)]
    assert on_kernels == [plain[0], plain[1] + 2 * layer]
    assert prefill_activation_bytes(SMOLLM2, 4, 24, 24, dequantized_from=96) > 2 * layer


def test_the_cache_holds_no_more_than_a_share_of_what_the_models_hold() -> None:
    from engine.memory import MIN_TRANSIENT_CACHE, TRANSIENT_SHARE

    g = MemoryGovernor(cache_limit=0, idle_release=1.0, ceiling=1 << 30)
    g.set_step_bytes(300 << 20, 40 << 20)
    g.prefilling(True, held=100 << 20)  # right after a load: the weights alone
    assert g.cache_limit == int(TRANSIENT_SHARE * (100 << 20)) < 16 << 20
    g.prefilling(True, held=10 << 20)
    assert g.cache_limit == MIN_TRANSIENT_CACHE
    g.prefilling(True, held=10 << 30)  # a share larger than a step needs: the step's
    assert g.cache_limit == 300 << 20
    g.prefilling(False, held=10 << 30)
    assert g.cache_limit == 40 << 20
    fixed = MemoryGovernor(cache_limit=123 << 20, idle_release=1.0, ceiling=1 << 30)
    fixed.set_step_bytes(5 << 30)
    fixed.prefilling(True, held=100 << 20)
    assert fixed.cache_limit == 123 << 20  # the user's limit stands


def test_steps_get_what_the_processs_own_memory_leaves_of_the_margin() -> None:
    from engine.memory import MEMORY_MARGIN, MIN_TRANSIENT_CACHE, TRANSIENT_SHARE

    g = MemoryGovernor(cache_limit=0, idle_release=1.0, ceiling=1 << 30)
    g.set_step_bytes(300 << 20, 40 << 20)
    held = 100 << 20
    share = int(TRANSIENT_SHARE * held)
    for own, budget in (
        (0, share),  # within its share of the margin: the step keeps its own
        (int((MEMORY_MARGIN - 2 * TRANSIENT_SHARE) * held), share),
        (14 << 20, (int(MEMORY_MARGIN * held) - (14 << 20)) // 2),  # a tokenizer's 14 MB
        (25 << 20, 0),  # the margin taken: prompts prefill in the smallest pieces
    ):
        g.own_bytes = own
        assert g.transient_budget(held) == budget
    assert budget == 0
    g.prefilling(True, held)  # not started: nothing measured, the last figure stands
    assert g.cache_limit == MIN_TRANSIENT_CACHE


def test_the_processs_own_memory_leaves_out_mlxs_arrays_and_cache() -> None:
    g = MemoryGovernor(cache_limit=0, idle_release=1.0, ceiling=1 << 30)
    g.start()
    weights = mx.ones((16 << 20,))  # 64 MB of MLX arrays: a model's, not the process's own
    mx.eval(weights)
    g.prefilling(True, held=1 << 30)
    assert g.own_bytes < 32 << 20
    tokenizer = b"x" * (64 << 20)  # 64 MB outside MLX, resident
    g.prefilling(True, held=1 << 30)
    assert g.own_bytes >= 60 << 20
    del weights, tokenizer
