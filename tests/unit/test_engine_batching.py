"""The engine over a tiny random model: batched equals single, seeds reproduce, caches behave."""

import random

import pytest

from engine.prefill_plan import MIN_PIECE
from engine.types import FinishReason, GenerateRequest, SamplingParams
from tests.unit.engine_harness import EOS, Harness, tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def llama_model():
    return tiny_llama()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, EOS - 1) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def greedy(i: int, p: list[int], **kw) -> GenerateRequest:
    return GenerateRequest(f"r{i}", "m", p, SamplingParams(max_tokens=10 + i, temperature=0, **kw))


def alone_and_batched(model, ps: list[list[int]]) -> tuple[dict, dict]:
    """Greedy outputs of each prompt run alone, and of all of them in one batch (two joining a
    step, so rows are left-padded differently): equal when batching changes no token."""
    alone = {}
    for i, p in enumerate(ps):
        alone.update(Harness(model, prefix_bytes=0).run([greedy(i, p)]))
    batched = Harness(model, prefix_bytes=0).run([greedy(i, p) for i, p in enumerate(ps)], every=2)
    return alone, batched


def seeded(i: int, p: list[int]) -> GenerateRequest:
    params = SamplingParams(
        max_tokens=10,
        temperature=0.9,
        top_p=0.9,
        top_k=50,
        min_p=0.01,
        seed=1000 + i,
        repetition_penalty=1.2,
        presence_penalty=0.3,
    )
    return GenerateRequest(f"s{i}", "m", p, params)


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-now", "read-a-step-late"])
def test_batched_equals_single_greedy(llama_model, pipelined):
    ps = prompts(6)
    alone = {}
    for i, p in enumerate(ps):
        alone.update(Harness(llama_model, pipelined=pipelined).run([greedy(i, p)]))
    # Requests join every 3 steps and leave at different lengths, prompts are chunked by a
    # 16-token budget shared with the running decodes.
    h = Harness(llama_model, pipelined=pipelined)
    batched = h.run([greedy(i, p) for i, p in enumerate(ps)], every=3)
    assert batched == alone
    assert all(len(v) == 10 + i for i, v in enumerate(alone.values()))


def test_seeded_sampling_reproduces_in_any_batch(llama_model):
    ps = prompts(5, seed=1)
    alone = {}
    for i, p in enumerate(ps):
        alone.update(Harness(llama_model).run([seeded(i, p)]))
    batched = Harness(llama_model).run([seeded(i, p) for i, p in enumerate(ps)], every=2)
    assert batched == alone
    other_seed = Harness(llama_model).run(
        [GenerateRequest("x", "m", ps[0], SamplingParams(max_tokens=10, temperature=0.9, seed=7))]
    )
    assert other_seed["x"] != alone["s0"]


def test_prefix_cache_reuses_and_matches(llama_model):
    shared = prompts(1, seed=2)[0] * 3  # a long common "system prompt"
    first = greedy(0, shared + [5, 6, 7])
    second = GenerateRequest(
        "r1", "m", shared + [8, 9], SamplingParams(max_tokens=8, temperature=0)
    )
    h = Harness(llama_model)
    h.run([first])
    h.run([second])
    assert h.finals["r1"].metrics.cached_tokens >= len(shared)
    cold = Harness(llama_model, prefix_bytes=0).run([second])
    assert h.outputs["r1"] == cold["r1"]
    # The same prompt again: all of it but the last token is cached; it goes straight to decode.
    again = GenerateRequest("r2", "m", second.prompt_token_ids, second.params)
    h.run([again])
    assert h.finals["r2"].metrics.cached_tokens == len(second.prompt_token_ids) - 1
    assert h.outputs["r2"] == cold["r1"]


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-now", "read-a-step-late"])
def test_abort_frees_everything(llama_model, pipelined):
    h = Harness(llama_model, budget=64, pipelined=pipelined)
    reqs = [greedy(i, p) for i, p in enumerate(prompts(20, seed=3))]
    h.run(reqs, abort_at={r.request_id: 2 + i % 5 for i, r in enumerate(reqs)})
    assert not h.scheduler.running and not h.scheduler.waiting
    assert h.kv.used_bytes == 0 and len(h.kv) == 0
    assert h.runner.num_active == 0 and h.runner.batch is None
    again = Harness(llama_model).run([greedy(0, [1, 2, 3])])
    assert h.run([greedy(0, [1, 2, 3])])["r0"][-10:] == again["r0"]


def test_stop_token_and_length(llama_model):
    p = prompts(1, seed=4)[0]
    free = Harness(llama_model).run([greedy(0, p)])["r0"]
    stop_at = free[3]
    h = Harness(llama_model)
    h.run([greedy(0, p, stop_token_ids=[stop_at])])
    assert h.outputs["r0"] == free[: free.index(stop_at) + 1]
    assert h.finals["r0"].finish_reason is FinishReason.STOP
    h2 = Harness(llama_model)
    h2.run([greedy(0, p)])
    assert h2.finals["r0"].finish_reason is FinishReason.LENGTH


def test_rotating_cache_matches_full_within_window_and_runs_past_it():
    model = tiny_gemma3(window=8)
    p = prompts(1, seed=5)[0][:6]
    req = GenerateRequest("g", "m", p, SamplingParams(max_tokens=30, temperature=0))
    full = Harness(model, prefix_bytes=0).run([req])["g"]
    # A rotating cache of 16 for every layer equals the full cache until 16 tokens are held.
    rotating = Harness(model, prefix_bytes=0, max_kv_size=16).run([req])["g"]
    assert rotating[: 16 - len(p)] == full[: 16 - len(p)]
    assert len(rotating) == 30
    alone, batched = alone_and_batched(model, prompts(4, seed=6))
    assert batched == alone


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-now", "read-a-step-late"])
def test_kv_grows_on_demand_and_preemption_changes_no_output(llama_model, pipelined):
    ps = prompts(6, seed=7)
    reqs = [greedy(i, p) if i % 2 else seeded(i, p) for i, p in enumerate(ps)]
    for r in reqs:
        r.params.max_tokens, r.params.ignore_eos = 24, True
    unpreempted = Harness(llama_model, pipelined=pipelined).run(reqs)
    # Room for about two sequences' KV: the youngest running are preempted and come back.
    most = max(len(p) for p in ps) + 24
    h = Harness(llama_model, kv_budget=2 * most, pipelined=pipelined)
    out = h.run(reqs, every=1)
    assert h.scheduler.preemptions > 0
    assert out == unpreempted
    assert {f.finish_reason for f in h.finals.values()} == {FinishReason.LENGTH}
    assert h.kv.used_bytes == 0 and not h.runner.states and not h.runner.rows


def test_prompt_scoring_matches_a_direct_forward(llama_model):
    import mlx.core as mx

    p = prompts(1, seed=8)[0] + prompts(1, seed=9)[0]
    params = SamplingParams(
        max_tokens=0, temperature=0, prompt_logprobs=True, logprobs=True, top_logprobs=2
    )
    h = Harness(llama_model, budget=8)  # several prefill chunks
    h.run([GenerateRequest("score", "m", p, params)])
    final = h.finals["score"]
    assert final.finish_reason is FinishReason.LENGTH and h.outputs["score"] == []
    scores = final.prompt_logprobs
    assert [s.token_id for s in scores] == p[1:]
    logits = llama_model(mx.array([p]))[0].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = [lp[i, p[i + 1]].item() for i in range(len(p) - 1)]
    assert all(abs(a.logprob - b) < 1e-3 for a, b in zip(scores, expected))
    assert all(len(s.top) == 2 and s.top[0][2] >= s.top[1][2] for s in scores)


def test_new_prompts_prefill_in_batches_within_the_prefill_budget(llama_model):
    ps = prompts(8, seed=3)
    alone = {}
    for i, p in enumerate(ps):
        alone.update(Harness(llama_model, budget=512).run([greedy(i, p)]))
    h = Harness(llama_model, budget=512)
    h.runner.prefill_bytes = lambda rows, width, keys: rows * width * keys
    h.runner.prefill_budget = lambda: 3 * 30 * 30
    batches: list[list[int]] = []
    together = h.runner._prefill_together

    def spy(group):
        batches.append([s.seq.num_prefill - 1 for s in group])  # each row's new tokens
        together(group)

    h.runner._prefill_together = spy
    assert h.run([greedy(i, p) for i, p in enumerate(ps)]) == alone
    assert len(batches) >= 2 and sum(map(len, batches)) >= 6  # split, and still batched
    for widths in batches:
        assert len(widths) * max(widths) ** 2 <= h.runner.prefill_budget()
        assert widths == sorted(widths)  # shortest first: little padding


def pieced(model, req: GenerateRequest) -> tuple[Harness, dict, list[int]]:
    """A run where every prompt piece is the smallest; the widths of its prefill calls."""
    h = Harness(model, budget=512)
    h.runner.prefill_bytes = lambda rows, width, keys: rows * width * keys
    h.runner.prefill_budget = lambda: 1
    calls: list[int] = []
    h.runner.model = lambda x, cache: calls.append(x.shape[1]) or model(x, cache=cache)
    return h, h.run([req]), [n for n in calls if n > 1]


def test_a_prompt_over_the_prefill_budget_prefills_in_pieces(llama_model):
    p = [t for seed in range(8, 16) for t in prompts(1, seed=seed)[0]][:200]
    scored = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=True)
    assert len(p) > 2 * MIN_PIECE
    for req in (greedy(0, p), GenerateRequest("s", "m", p, scored)):
        whole = Harness(llama_model, budget=512)
        h, out, widths = pieced(llama_model, req)
        assert out == whole.run([req])
        assert sum(widths) == len(p) - 1 and widths[:-1] == [MIN_PIECE] * (len(widths) - 1)
    scores = [s.logprob for s in h.finals["s"].prompt_logprobs]
    expected = [s.logprob for s in whole.finals["s"].prompt_logprobs]
    assert len(scores) == len(p) - 1 and scores == pytest.approx(expected, abs=1e-4)
