"""Speculative bookkeeping with a fake runner (no MLX): drafts take KV and budget, the rejected
ones give it back, accepted tokens stream as if decoded one by one."""

from collections.abc import Callable

import pytest

from engine.core import EngineCore
from engine.drafter import NgramDrafter, can_draft, fit_width
from engine.kv_manager import KVManager
from engine.outputs import RunnerOutput, Sampled, SchedulerOutput, StepOutput
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.types import GenerateRequest, SamplingParams

CYCLE = list(range(10, 20))
PROMPT = CYCLE * 3  # the model "continues the cycle", so n-gram drafts from the prompt hold ...
SLIP = {5: 99, 17: 98}  # ... except at these output indices, where drafts get rejected


def truth(n: int) -> list[int]:
    return [SLIP.get(i, CYCLE[i % len(CYCLE)]) for i in range(n)]


class ScriptRunner:
    """Each row's true continuation is `truth`; a draft holds while it matches it. Checks that
    every step computes exactly the KV positions the scheduler says, drafts included."""

    def __init__(self, truth: Callable[[int], list[int]] = truth) -> None:
        self.truth = truth
        self.constrained = False
        self.kv: dict[str, int] = {}  # positions computed per row, as this 'cache' holds them
        self.widest = 0

    def submit(self, out: SchedulerOutput) -> "Done":
        res = RunnerOutput()
        for x in out.scheduled:
            seq = x.seq
            assert self.kv.get(seq.id, 0) == x.start, "the KV and the scheduler disagree"
            self.kv[seq.id] = x.start + x.num_tokens
            self.widest = max(self.widest, len(x.draft))
            if not x.samples:
                continue
            gen = seq.num_generated - 1  # the index of the token this step samples
            want = self.truth(gen + len(x.draft) + 1)[gen:]
            accepted = 0
            while accepted < len(x.draft) and x.draft[accepted] == want[accepted]:
                accepted += 1
            res.tokens[seq.id] = [Sampled(t) for t in want[: accepted + 1]]
            self.kv[seq.id] -= len(x.draft) - accepted  # the per-row trim
        for seq in [*out.finished, *out.preempted]:
            self.kv.pop(seq.id, None)
        return Done(res)

    def reset(self) -> None:
        self.kv.clear()


class Done:
    def __init__(self, res: RunnerOutput):
        self.res = res

    def start(self) -> None:
        pass

    def result(self) -> RunnerOutput:
        return self.res


def make(
    mode: str = "on",
    k: int = 4,
    kv: int = 10**6,
    overlap: bool = False,
    budget: int = 64,
    script: Callable[[int], list[int]] = truth,
):
    cfg = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=budget,
        max_waiting=64,
        context_length=1000,
        kv_chunk=2,
        speculative=mode,
        speculative_tokens=k,
    )
    sent: dict[str, list[StepOutput]] = {}
    runner = ScriptRunner(script)
    core = EngineCore(
        Scheduler(cfg, KVManager(kv)),
        runner,
        lambda seq, out: sent.setdefault(seq.id, []).append(out),
        overlap=overlap,
    )
    return core, runner, sent


def add(core: EngineCore, rid: str, max_tokens: int = 30, **kw) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    seq = Sequence(GenerateRequest(rid, "m", list(PROMPT), params))
    core.add(seq)
    return seq


def run(core: EngineCore) -> int:
    steps = 0
    while core.has_work:
        core.step()
        steps += 1
        for seq in core.scheduler.running:
            if not seq.prefilling and not seq.in_flight:  # KV up to all but the last token
                assert seq.num_computed == seq.num_tokens - 1
        assert steps < 500
    return steps


def streamed(sent: dict[str, list[StepOutput]]) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in sent.items()}


@pytest.mark.parametrize("overlap", [False, True], ids=["read-now", "overlapped"])
def test_accepted_drafts_stream_like_single_steps_and_rejected_ones_are_taken_back(overlap):
    plain, _, plain_sent = make("off", overlap=overlap)
    spec, runner, spec_sent = make("on", overlap=overlap)
    for core in (plain, spec):
        add(core, "a")
        add(core, "b", max_tokens=23)
    plain_steps, spec_steps = run(plain), run(spec)
    assert streamed(spec_sent) == streamed(plain_sent) == {"a": truth(30), "b": truth(23)}
    s = spec.scheduler
    assert s.accepted > 0 and s.drafted > s.accepted  # the slips were drafted past, and rejected
    assert spec_steps < plain_steps * 0.6 and runner.widest >= 3
    assert s.kv.used_bytes == 0 and not runner.kv


def test_drafts_stop_at_max_tokens_and_finish_at_a_stop_token():
    core, _, sent = make("on", k=8)
    add(core, "a", max_tokens=9)
    add(core, "b", stop_token_ids=[15], max_tokens=30)  # output index 5 is 99: stops at 15
    run(core)
    assert streamed(sent)["a"] == truth(9)
    assert streamed(sent)["b"] == truth(16)  # ..., 99 (index 5), ..., 15 (index 15)


def test_auto_drafts_only_while_the_batch_is_small():
    core, runner, _ = make("auto")
    for i in range(5):
        add(core, f"r{i}", max_tokens=30 if i == 4 else 8)
    run(core)
    assert runner.widest > 0  # once rows finish, the last one drafts alone ...
    core, runner, _ = make("auto", budget=256)  # all six admitted in the first step
    for i in range(6):
        add(core, f"r{i}", max_tokens=4)  # ... here six run to the end together
    run(core)
    assert runner.widest == 0 and core.scheduler.drafted == 0


def test_rows_whose_tokens_a_verify_pass_cannot_pick_exactly_never_draft():
    assert can_draft(SamplingParams(temperature=0))
    assert can_draft(SamplingParams(temperature=0.8, top_k=1))
    assert can_draft(SamplingParams(temperature=0.7, seed=1, top_k=40, top_p=0.9, min_p=0.05))
    assert can_draft(SamplingParams(temperature=0, logit_bias={3: 1.0}))
    assert can_draft(SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1))
    assert can_draft(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.2))
    for kw in (
        {"temperature": 0, "logprobs": True},
        {"temperature": 0.7, "prompt_logprobs": True},
        {"temperature": 0, "grammar": object()},
        {"temperature": 0.7, "logits_processors": [lambda ids, x: x]},
    ):
        assert not can_draft(SamplingParams(**kw)), kw
    core, runner, _ = make("on")
    params = SamplingParams(temperature=0.7, logprobs=True)
    core.add(Sequence(GenerateRequest("s", "m", list(PROMPT), params)))
    run(core)
    assert runner.widest == 0


def test_sampled_rows_draft_and_stream_their_tokens_like_greedy_ones():
    plain, _, plain_sent = make("off")
    spec, runner, spec_sent = make("on")
    for core in (plain, spec):
        params = SamplingParams(max_tokens=30, temperature=0.7, top_k=40, seed=3)
        core.add(Sequence(GenerateRequest("s", "m", list(PROMPT), params)))
    run(plain), run(spec)
    assert streamed(spec_sent) == streamed(plain_sent) == {"s": truth(30)}
    assert runner.widest >= 3 and spec.scheduler.accepted > 0


def test_only_rows_that_may_draft_keep_the_engine_from_overlapping_steps():
    """A step is read before the next is scheduled only while some row may draft."""
    core, _, _ = make("auto", overlap=True)
    params = SamplingParams(temperature=0.7, logprobs=True)
    core.add(Sequence(GenerateRequest("s", "m", list(PROMPT), params)))
    core.step()
    assert not core.scheduler.speculating  # a row reporting logprobs alone: steps overlap
    add(core, "g")
    core.step()
    assert core.scheduler.speculating  # a row that may draft joined: its drafts need its token
    run(core)


def test_drafts_never_preempt_and_give_back_their_kv():
    # Two rows whose KV fits without drafts: drafting must not push either out.
    need = len(PROMPT) + 30 + 4
    core, _, sent = make("on", k=8, kv=2 * need)
    add(core, "a")
    add(core, "b")
    run(core)
    assert core.scheduler.preemptions == 0 and core.scheduler.drafted > 0
    assert streamed(sent) == {"a": truth(30), "b": truth(30)}


def test_a_reservation_grown_for_drafts_shrinks_after_a_reject():
    core, _, _ = make("on", k=8)
    a = add(core, "a", max_tokens=30)
    for _ in range(6):  # admitted, then drafts held, then index 5's slip is rejected
        core.step()
    assert core.scheduler.drafted > core.scheduler.accepted
    assert a.kv_tokens <= a.num_computed + 1 + core.scheduler.config.kv_chunk


def test_drafts_count_in_the_token_budget():
    core, runner, _ = make("on", k=8, budget=3)  # prefill in chunks of 3, then 1 + 2 drafts
    add(core, "a", max_tokens=20)
    run(core)
    assert runner.widest == 2


def test_ngram_drafts_come_from_the_most_recent_longest_match():
    d = NgramDrafter(4)
    text = [1, 2, 3, 4, 9, 9, 1, 2, 3, 4, 7, 8, 5, 1, 2, 3, 4]
    assert d.propose("x", text, 4) == [7, 8, 5, 1]  # [1, 2, 3, 4] last seen before 7, 8
    assert d.propose("x", [*text, 7], 2) == [8, 5]  # the index grows with the text
    assert d.propose("y", [1, 2, 3, 4], 4) == []  # nothing repeats
    assert d.propose("z", [5, 1, 2, 6, 1, 2], 4) == [6]  # a 2-gram backs one token
    assert d.propose("w", [5, 1, 2, 3, 6, 1, 2, 3], 4) == [6, 1]  # a 3-gram half of k
    d.observe("x", 2, 0)  # a total miss halves the row's trust
    assert d.propose("x", [*text, 7], 4) == [8, 5]


def test_a_draft_width_is_verified_only_while_the_drafts_pay_for_the_positions_it_adds():
    """Rates are the chance each drafted token holds (once those before it did)."""
    # Break-even is a = 0.29 a token; drafting needs 5% more speed (MIN_GAIN): from 0.35.
    assert fit_width([8], 1, rates=[0.33]) == 0 and fit_width([8], 1, rates=[0.36]) == 1
    assert fit_width([8], 1, rates=[0.6]) == 2
    assert fit_width([8], 1, rates=[0.9]) == 5 and fit_width([8], 1, rates=[0.99]) == 8
    assert fit_width([4], 2, rates=[0.85]) == 0  # the other row would compute 4 positions too
    assert (
        fit_width([4, 4], 2, rates=[0.8, 0.8]) == 2 and fit_width([4, 1], 2, rates=[0.4] * 2) == 0
    )
    assert (
        fit_width([4] * 3, 3, rates=[0.5] * 3) == 0 and fit_width([8] * 4, 4, rates=[0.9] * 4) == 2
    )
    assert fit_width([], 1) == 0
    # The runner's bound for exact verification (its kernels' row limit): rows x (1 + width).
    assert fit_width([8, 8], 2, 63, [0.99] * 2) == 8 and fit_width([8, 8], 2, 15, [0.99] * 2) == 6
    assert fit_width([8] * 40, 40, 63, [0.99] * 40) == 0


def test_one_drafting_row_among_rows_that_cannot_does_not_pad_the_batch_with_drafts():
    core, runner, sent = make("on")
    add(core, "greedy")
    for i in range(3):  # logprobs rows never draft; each would compute the greedy row's width
        params = SamplingParams(max_tokens=30, temperature=0.7, seed=i, logprobs=True)
        core.add(Sequence(GenerateRequest(f"s{i}", "m", list(PROMPT), params)))
    run(core)
    assert runner.widest == 0 and streamed(sent)["greedy"] == truth(30)


def test_a_row_whose_drafts_mostly_miss_stops_drafting_and_tries_again_later():
    """Each row's rate follows what its drafts did (sampled rows at a high temperature hold
    fewer), from its kind's rate; drafts not worth verifying let it drift back up."""
    d = NgramDrafter(4)
    text = [1, 2, 3, 4, 5, 1, 2, 3, 4]
    assert d.propose("x", text, 4, greedy=False) == [5, 1, 2, 3]
    assert d.rate("x") == d.learned[False] == 0.5
    for _ in range(3):
        d.observe("x", 2, 0)
    assert d.rate("x") < 0.25 and fit_width([4], 1, rates=[d.rate("x")]) == 0
    assert d.learned[False] < 0.5 and d.learned[True] == 0.65  # sampled rows' rate fell
    low = d.rate("x")
    for _ in range(40):
        d.skipped("x")
    assert 0.5 > d.rate("x") > low  # the evidence faded: back near its kind's rate
    d.observe("x", 4, 4)
    d.observe("x", 4, 4)
    assert d.rate("x") > 0.75 and fit_width([4], 1, rates=[d.rate("x")]) == 4


def never_as_before(n: int) -> list[int]:
    """1, 2, then a token never seen: a drafted guess at what follows 1, 2 always misses."""
    return [[1, 2, 100 + i // 3][i % 3] for i in range(n)]


def test_a_row_whose_drafts_always_miss_drafts_less_and_less():
    """Each miss costs the positions it adds: a row whose drafts never hold (a hot sampled
    row) soon stops drafting, tries again now and then, and streams what decoding alone does."""
    core, _, sent = make("on", script=never_as_before)
    params = SamplingParams(max_tokens=240, temperature=1.5, seed=1)
    core.add(Sequence(GenerateRequest("s", "m", [1, 2, 99], params)))
    run(core)
    assert streamed(sent)["s"] == never_as_before(240)
    s = core.scheduler
    assert s.accepted == 0 and 0 < s.drafted <= 12  # 79 chances to draft after "1, 2"


def test_a_row_rates_its_drafts_by_the_ngram_backing_them():
    """A copy's 2-gram drafts miss where its 4-gram ones hold: misses of the first don't hold
    back the second (a trust-capped 1-token draft of a copy stayed under the verify threshold)."""
    d = NgramDrafter(4)
    copy = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4]
    assert d.propose("x", copy, 4) == [5, 6, 1, 2]
    for _ in range(4):
        d.observe("x", 4, 4)
    text = [*copy, 9, 3, 4]
    assert d.propose("x", text, 4) == [9]  # 2-gram backed: [3, 4] was followed by 9
    for _ in range(4):
        d.observe("x", 1, 0)
    assert d.rate("x") < 0.5 and fit_width([1], 1, rates=[d.rate("x")]) == 0
    assert d.propose("x", [*text, 5, 6, 1, 2, 3, 4], 1) == [9]  # 4-gram backed, trust 1
    assert d.rate("x") > 0.85 and fit_width([1], 1, rates=[d.rate("x")]) == 1
