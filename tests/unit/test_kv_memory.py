"""The KV the runner reports: its arrays' real sizes, kept current within a step."""

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache

from engine.speculative import BatchKVCache
from engine.types import GenerateRequest, SamplingParams
from tests.unit.engine_harness import Harness, tiny_llama


def test_kv_in_use_follows_the_caches_within_a_step():
    model = tiny_llama()
    h = Harness(model, budget=512)
    # Prompts of 3..24 tokens, each prefill batch at most two of them.
    h.runner.prefill_bytes = lambda rows, width, keys: rows
    h.runner.prefill_budget = lambda: 2
    seen: list[tuple[int, int]] = []
    together = h.runner._prefill_together

    def spy(group):
        seen.append((h.runner.kv_in_use, h.runner.kv_bytes()))
        together(group)

    h.runner._prefill_together = spy
    at_step_end: list[tuple[int, int]] = []
    step = h.core.step

    def stepped():
        step()
        at_step_end.append((h.runner.kv_in_use, h.runner.kv_bytes()))

    h.core.step = stepped  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=6, temperature=0)
    h.run([GenerateRequest(f"r{i}", "m", list(range(5, 8 + 3 * i)), params) for i in range(8)])
    assert len(seen) >= 3
    # Before each later batch of one step, the batches already prefilled are counted.
    assert all(live == real for live, real in seen)
    assert seen[1][0] > 0 and seen[2][0] > seen[1][0]
    assert all(live == real for live, real in at_step_end)
    assert at_step_end[-1] == (0, 0)  # every row gone


def test_the_batch_cache_grows_in_small_steps_and_reports_its_capacity():
    def filled(n: int) -> KVCache:
        c = KVCache()
        c.update_and_fetch(mx.ones((1, 2, n, 4)), mx.ones((1, 2, n, 4)))
        return c

    batch = BatchKVCache.merge([filled(5), filled(9)])
    assert BatchKVCache.step < mlx_cache.BatchKVCache.step
    for _ in range(150):
        new = mx.zeros((2, 2, 1, 4))
        batch.update_and_fetch(new, new)
        room = batch.keys.shape[2] - batch.size()
        assert 0 <= room < BatchKVCache.step
        assert batch.nbytes == 2 * batch.keys.size * 4  # keys and values, float32
