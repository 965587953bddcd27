"""The KV the runner reports: its arrays' real sizes, kept current within a step; prompt caches
sized to their tokens; a batch's copies computed one layer at a time."""

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, make_prompt_cache

from engine import kv_memory
from engine import runner as runner_module
from engine.kv_memory import PROMPT_STEP, fit_to_prompt, settle
from engine.speculative import BatchKVCache
from engine.types import GenerateRequest, SamplingParams
from tests.unit.engine_harness import Harness, tiny_gemma3, tiny_llama


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


def test_a_prefilling_sequences_own_caches_hold_its_tokens_and_no_more():
    plain = fit_to_prompt(make_prompt_cache(tiny_llama()))
    for n, total in ((5, 5), (3, 8)):  # a prompt in two pieces
        for c in plain:
            c.update_and_fetch(mx.ones((1, 2, n, 16)), mx.ones((1, 2, n, 16)))
            assert c.keys.shape[2] == total and c.nbytes == 2 * total * 2 * 16 * 4
    # Sliding-window layers keep mlx-lm's rotating caches as they are.
    mixed = fit_to_prompt(make_prompt_cache(tiny_gemma3()))
    rotating = [c for c in mixed if type(c) is not KVCache]
    assert rotating and all(c.step == type(c).step for c in rotating)
    assert all(c.step == PROMPT_STEP for c in mixed if type(c) is KVCache)


def test_a_joining_prompts_kv_is_counted_before_it_is_computed():
    h = Harness(tiny_llama(), budget=64)
    counted: list[tuple[int, int]] = []
    join = h.runner._join

    def spy(seq, caches):
        # The prefill is still lazy here: the caches' sizes are known, their values not yet.
        counted.append((h.runner.kv_in_use, sum(c.nbytes for c in caches)))
        join(seq, caches)

    h.runner._join = spy  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=4, temperature=0)
    h.run(
        [GenerateRequest(f"r{i}", "m", list(range(5, 30 + 7 * i)), params) for i in range(3)],
        every=3,
    )
    assert len(counted) == 3
    for in_use, own in counted:
        assert own > 0 and in_use >= own


def _settles(monkeypatch, h: Harness) -> list[tuple[tuple[str, ...], bool]]:
    """(rows after the step, whether the batch was settled in it) of each step."""
    log: list[tuple[tuple[str, ...], bool]] = []
    calls: list[int] = []
    for module in (runner_module, kv_memory):  # at the decode, and as rows leave
        monkeypatch.setattr(module, "settle", lambda caches: (calls.append(1), settle(caches)))
    step = h.core.step

    def stepped():
        before = len(calls)
        step()
        log.append((tuple(h.runner.rows), len(calls) > before))

    h.core.step = stepped  # type: ignore[method-assign]
    return log


def test_the_batch_is_settled_in_a_step_only_when_rows_joined_or_left(monkeypatch):
    h = Harness(tiny_llama(), budget=64)
    log = _settles(monkeypatch, h)
    params = [SamplingParams(max_tokens=3 + 2 * i, temperature=0) for i in range(5)]
    h.run(
        [GenerateRequest(f"r{i}", "m", list(range(5, 12 + i)), params[i]) for i in range(5)],
        every=2,
    )
    assert any(settled for _, settled in log) and not all(settled for _, settled in log)
    previous: tuple[str, ...] = ()
    for rows, settled in log:
        assert settled == (rows != previous and bool(rows))
        previous = rows


def test_settling_changes_no_output(monkeypatch):
    def outputs(settling: bool) -> dict[str, list[int]]:
        if not settling:
            for module in (runner_module, kv_memory):
                monkeypatch.setattr(module, "settle", lambda caches: None)
        h = Harness(tiny_llama(), budget=64)
        params = SamplingParams(max_tokens=8, temperature=0)
        reqs = [GenerateRequest(f"r{i}", "m", list(range(5, 14 + 3 * i)), params) for i in range(6)]
        return h.run(reqs, every=2)

    assert outputs(True) == outputs(False)


def test_a_settled_batch_holds_its_rows_only():
    def filled(n: int) -> KVCache:
        c = KVCache()
        c.update_and_fetch(mx.ones((1, 2, n, 64)), mx.ones((1, 2, n, 64)))
        return c

    before = mx.get_active_memory()
    batch = BatchKVCache.merge([filled(400), filled(10), filled(20)])
    mx.eval(batch.keys, batch.values)
    batch.filter(mx.array([1, 2]))  # the longest row leaves: the padding before the rest goes
    settle([batch])
    mx.synchronize()  # settle queues the copies
    kv = batch.keys.nbytes + batch.values.nbytes
    assert batch.keys.shape[2] == 20
    # The rows' 20 positions are all that is held, not a view of the 400 the filter sliced.
    assert mx.get_active_memory() - before < 2 * kv  # a view of 400 would hold 20x it
