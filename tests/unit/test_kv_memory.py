"""The KV the runner reports: its arrays' real sizes, kept current within a step."""

from engine.types import GenerateRequest, SamplingParams
from tests.unit.engine_harness import Harness, tiny_llama


def test_kv_in_use_follows_the_caches_within_a_step():
    model = tiny_llama()
    h = Harness(model, budget=512)
    # Prompts of 3..24 tokens, each prefill batch at most two of them.
    h.runner.prefill_bytes = lambda rows, width, keys: rows
    h.runner.prefill_budget = 2
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
