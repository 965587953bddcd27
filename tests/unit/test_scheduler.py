"""The scheduler alone, with a fake runner: pure Python, milliseconds."""

import pytest

from engine.errors import QueueFullError
from engine.kv_manager import KVManager
from engine.outputs import RunnerOutput, Sampled
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.types import FinishReason, GenerateRequest, SamplingParams


def seq(rid: str, n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(
        GenerateRequest(
            rid, "m", list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens)
        )
    )


def make(budget=8, max_seqs=4, kv=10**6, waiting=8, lookup=lambda t: 0, chunk=2) -> Scheduler:
    cfg = SchedulerConfig(
        kv_chunk=chunk,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_waiting=waiting,
        kv_bytes_per_token=1,
        context_length=1000,
    )
    return Scheduler(cfg, KVManager(kv), lookup, eos_ids={0})


def fake_run(s: Scheduler, token: int = 7) -> dict[str, int]:
    """One step with a fake runner that samples `token` for each sequence that samples;
    returns the plan (sequence id -> tokens computed)."""
    out = s.schedule()
    res = RunnerOutput({x.seq.id: [Sampled(token)] for x in out.scheduled if x.samples})
    s.update_from_output(out, res)
    return {x.seq.id: x.num_tokens for x in out.scheduled}


def test_chunked_prefill_shares_budget_with_decodes():
    s = make(budget=8)
    s.add(seq("a", 3, max_tokens=10))
    assert fake_run(s) == {"a": 3}  # whole prompt fits
    s.add(seq("b", 20))
    # a decodes 1 token; b takes the remaining 7 of the budget, then 7, then 6
    assert fake_run(s) == {"a": 1, "b": 7}
    assert fake_run(s) == {"a": 1, "b": 7}
    assert fake_run(s) == {"a": 1, "b": 6}
    assert fake_run(s) == {"a": 1, "b": 1}


def test_fifo_admission_and_seq_cap():
    s = make(budget=100, max_seqs=2)
    for r in "abc":
        s.add(seq(r, 2, max_tokens=2))
    assert set(fake_run(s)) == {"a", "b"}
    assert [x.id for x in s.waiting] == ["c"]
    fake_run(s)  # a and b reach max_tokens and finish
    assert set(fake_run(s)) == {"c"}


def test_kv_is_reserved_for_the_prompt_and_a_chunk_then_grows():
    s = make(budget=100, kv=100, chunk=4)
    a = seq("a", 6, max_tokens=20)
    s.add(a)
    fake_run(s)
    assert a.kv_tokens == 10 and s.kv.used_bytes == 10
    for _ in range(4):  # tokens 7..10 fit
        fake_run(s)
    assert a.kv_tokens == 10
    fake_run(s)  # the 11th grows the reservation by a chunk
    assert a.kv_tokens == 14 and s.kv.used_bytes == 14


def test_out_of_kv_preempts_the_youngest_which_resumes_where_it_stopped():
    s = make(budget=100, kv=10, chunk=2)
    a, b = seq("a", 4, max_tokens=6), seq("b", 2, max_tokens=6)
    s.add(a)
    s.add(b)
    assert fake_run(s) == {"a": 4, "b": 2}  # 6 + 4 reserved: the budget is full
    fake_run(s)
    fake_run(s)
    assert fake_run(s) == {"a": 1}  # a needs a 7th token's KV: b, the youngest, gives room
    assert s.preemptions == 1 and list(s.waiting) == [b] and b.kv_tokens == 0
    assert b.output_ids == [7, 7, 7] and b.num_computed == 0
    while s.running:
        fake_run(s)
    # b is readmitted: it prefills its prompt and the 3 tokens it had, then goes on
    assert fake_run(s) == {"b": 5} and b.num_prefill == 5
    while s.running:
        fake_run(s)
    assert b.output_ids == [7] * 6 and b.finish_reason is FinishReason.LENGTH
    assert s.kv.used_bytes == 0


def test_a_lone_sequence_the_budget_cannot_hold_fails_instead_of_hanging():
    s = make(budget=100, kv=8, chunk=2)
    a = seq("a", 4, max_tokens=20)
    s.add(a)
    for _ in range(10):
        fake_run(s)
    assert a.finish_reason is FinishReason.ERROR and s.rejections["memory"] == 1
    assert s.kv.used_bytes == 0 and not s.running


def test_request_larger_than_kv_budget_fails_instead_of_waiting():
    s = make(kv=5)
    big = seq("big", 10)
    s.add(big)
    out = s.schedule()
    assert big.finish_reason is FinishReason.ERROR and big in out.finished
    assert not s.waiting and s.rejections["memory"] == 1


def test_queue_bound():
    s = make(waiting=2)
    s.add(seq("a", 1))
    s.add(seq("b", 1))
    with pytest.raises(QueueFullError):
        s.add(seq("c", 1))
    assert s.rejections["queue_full"] == 1


def test_eos_and_abort_free_kv():
    s = make(budget=100)
    a, b = seq("a", 3, max_tokens=50), seq("b", 3, max_tokens=50)
    s.add(a)
    s.add(b)
    fake_run(s)
    out = s.schedule()
    eos_for_a = RunnerOutput({"a": [Sampled(0)], "b": [Sampled(5)]})
    sent = {q.id: o for q, o in s.update_from_output(out, eos_for_a)}
    assert a.finish_reason is FinishReason.STOP
    assert sent["a"].finish_reason is FinishReason.STOP and sent["b"].finish_reason is None
    s.abort("b")
    assert b.finish_reason is FinishReason.ABORT
    assert s.kv.used_bytes == 0 and not s.running
    released = s.schedule().finished
    assert {x.id for x in released} == {"a", "b"}


def test_prefix_lookup_skips_cached_tokens_but_computes_the_last():
    s = make(budget=100, lookup=lambda toks: len(toks))  # everything cached
    a = seq("a", 10)
    s.add(a)
    assert fake_run(s) == {"a": 1}
    assert a.num_cached == 9 and a.metrics.cached_tokens == 9


def test_shared_prefix_waits_for_the_prefill_in_progress():
    s = make(budget=40)
    s.add(seq("a", 100))
    s.add(seq("b", 100))  # same tokens 1..100
    assert fake_run(s) == {"a": 40}
    assert [x.id for x in s.waiting] == ["b"]  # b waits to reuse a's KV
    fake_run(s)
    fake_run(s)  # a finishes its prefill
    assert "b" in fake_run(s)


def test_ignore_eos_runs_to_max_tokens_but_stop_token_ids_still_stop():
    s = make(budget=100)
    params = SamplingParams(max_tokens=3, ignore_eos=True, stop_token_ids=[9])
    a = Sequence(GenerateRequest("a", "m", [1, 2], params))
    s.add(a)
    for _ in range(3):
        fake_run(s, token=0)  # EOS every step
    assert a.output_ids == [0, 0, 0] and a.finish_reason is FinishReason.LENGTH
    b = Sequence(GenerateRequest("b", "m", [1, 2], params))
    s.add(b)
    fake_run(s, token=9)
    assert b.output_ids == [9] and b.finish_reason is FinishReason.STOP


def test_a_prompt_being_scored_when_preempted_is_scored_again_not_twice():
    s = make(budget=4, kv=10**6)
    a = Sequence(
        GenerateRequest(
            "a", "m", list(range(1, 11)), SamplingParams(max_tokens=2, prompt_logprobs=True)
        )
    )
    s.add(a)
    first = s.schedule()  # tokens 1..4 of the prompt
    scored = RunnerOutput(prompt_scores={"a": [Sampled(t, -1.0) for t in (2, 3, 4, 5)]})
    s.update_from_output(first, scored)
    second = s.schedule()  # tokens 5..8: their scores still in flight when a is preempted
    s._preempt(a, second)
    s.update_from_output(second, RunnerOutput(prompt_scores={"a": [Sampled(6, -1.0)]}))
    again = s.schedule()  # readmitted: the prompt from its start
    assert again.scheduled[0].start == 0 and a.num_prefill == 10
    s.update_from_output(again, RunnerOutput(prompt_scores={"a": [Sampled(2, -0.5)]}))
    assert [lp.token_id for lp in s._prompt_scores["a"]] == [2]
