"""The distributed serving path without a second process: a step plan survives its JSON trip, a
size-1 group carries messages, the watchdog trips, and a rank that runs rank 0's plans on its own
runner computes the same KV as rank 0 even when rank 0 samples (its own samples are never used)."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import pytest

from engine.distributed.group import Group, GroupError, Watchdog, prepare, share_cores
from engine.distributed.leader import LeaderRunner, kv_tokens
from engine.distributed.plan import decode_step, encode_step
from engine.distributed.worker import run_plan
from engine.outputs import ScheduledSeq, SchedulerOutput
from engine.prefix_cache import PrefixCache
from engine.runner import ModelRunner
from engine.sequence import Sequence
from engine.types import GenerateRequest, SamplingParams
from models.sharding import ShardingError, check_split, describe_split
from tests.unit.engine_harness import Harness, tiny_llama


def _seq(rid: str, prompt: list[int], output: list[int], **params: Any) -> Sequence:
    seq = Sequence(GenerateRequest(rid, "m", prompt, SamplingParams(**params)))
    seq.output_ids = list(output)
    return seq


def test_a_plan_survives_its_trip() -> None:
    new = _seq("new", [5, 6, 7, 8], [], prompt_logprobs=True, top_logprobs=2, temperature=0.7)
    back = _seq("back", [1, 2], [3, 4])  # preempted before: prefills prompt and output again
    back.num_prefill = 4
    decoding = _seq("dec", [9, 9], [10])
    out = SchedulerOutput(
        [ScheduledSeq(new, 3, 1, False, 1), ScheduledSeq(back, 4, 0, True, 0, 1),
         ScheduledSeq(decoding, 1, 2, True)],
        finished=[_seq("done", [1], [2, 3])],
        preempted=[_seq("gone", [4, 5], [6])],
    )  # fmt: skip
    message = json.loads(json.dumps(encode_step(out, {"dec"}, {"dec": 10})))
    plan = decode_step(message)
    rows = {s.seq.id: s for s in plan.out.scheduled}
    assert [s.seq.id for s in plan.out.scheduled] == ["new", "back", "dec"]
    n, b, d = rows["new"], rows["back"], rows["dec"]
    assert (n.num_tokens, n.start, n.samples, n.cached) == (3, 1, False, 1)
    assert n.seq.prefill_ids == [5, 6, 7, 8] and n.seq.prompt_ids == [5, 6, 7, 8]
    assert n.seq.params.prompt_logprobs and n.seq.params.top_logprobs == 2
    assert n.seq.params.temperature == 0.0  # a mirror decodes greedily: its samples are unused
    assert b.seq.prefill_ids == [1, 2, 3, 4] and b.seq.output_ids == [3, 4] and b.preemptions == 1
    assert d.seq.prefill_ids == [] and plan.feeds == {"dec": 10}  # tokens of a decoding row
    assert plan.out.finished[0].all_token_ids() == [1, 2, 3]
    assert plan.out.preempted[0].all_token_ids() == [4, 5, 6]


def test_a_group_of_one_carries_messages() -> None:
    group = Group("tensor", mx.distributed.init())
    assert group.size == 1
    message = {"k": "step", "s": [["chatcmpl-é", 1, 2, None]], "x": {"a": 7}}
    assert group.broadcast(message) == message
    assert group.gather([3, 2**31 - 1]) == [[3, 2**31 - 1]]


def test_the_watchdog_trips_once_past_its_deadline() -> None:
    trips: list[str] = []
    dog = Watchdog(trips.append, tick=0.01)
    with dog.guard("a quick one", 5.0):
        pass
    with dog.guard("a step", 0.05):
        time.sleep(0.3)
    assert trips == ["a rank stopped answering during a step"]


def test_splits_this_build_cannot_make_are_refused_before_any_group(monkeypatch) -> None:
    for var in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(GroupError, match="unknown split 'expert'"):
        prepare("expert")
    for mode in ("tensor", "pipeline"):
        with pytest.raises(GroupError, match="mlx.launch"):
            prepare(mode)
    monkeypatch.setenv("MLX_RANK", "2")
    assert prepare("tensor") == 2 and prepare("pipeline") == 2


def test_a_split_the_model_cannot_take_is_refused_before_any_weight_is_read() -> None:
    smollm2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "intermediate_size": 1536}  # fmt: skip
    check_split("tensor", smollm2, 3)
    with pytest.raises(ShardingError, match="do not divide over 2 ranks"):
        check_split("tensor", smollm2, 2)
    check_split("pipeline", smollm2, 2)  # any rank count up to the layer count
    check_split("pipeline", smollm2, 30)
    with pytest.raises(ShardingError, match="30 layers cannot be split over 31 ranks"):
        check_split("pipeline", smollm2, 31)
    assert describe_split("pipeline", 2, smollm2) == (
        "pipeline parallel over 2 ranks; rank 0: embedding, lm_head, layers 0-14; "
        "rank 1: layers 15-29"
    )


def test_each_rank_budgets_kv_for_its_own_share_of_a_token() -> None:
    def loaded(own_layers: int) -> SimpleNamespace:
        model = SimpleNamespace(model=SimpleNamespace(layers=[object()] * own_layers))
        return SimpleNamespace(config={"num_hidden_layers": 30}, model=model,
                               kv_bytes_per_token=lambda: 30 * 1000)  # fmt: skip

    def group(mode: str, n: int) -> Group:
        return Group(mode, SimpleNamespace(size=lambda: n, rank=lambda: 0))

    assert kv_tokens(loaded(30), group("tensor", 3), 10**7) == 1000  # 1/3 of every layer
    assert kv_tokens(loaded(15), group("pipeline", 2), 10**7) == 666  # 15 of 30 layers
    assert kv_tokens(loaded(7), group("pipeline", 4), 10**7) == 1428


class _Loopback:
    """Rank 0's Leader without a group: each plan runs at once on the other rank's runner."""

    failed = ""
    timeout = 60.0

    def __init__(self, other: ModelRunner):
        self.other = other
        self.plans = 0

    def send(self, message: dict[str, Any], what: str) -> None:
        run_plan(self.other, json.loads(json.dumps(message)))
        self.plans += 1

    def call(self, what: str, fn: Any, timeout: float | None = None) -> Any:
        return fn()

    def fail(self, message: str) -> None:
        raise AssertionError(message)


def test_another_rank_follows_rank_zeros_samples() -> None:
    model = tiny_llama()
    h = Harness(model, budget=6, prefix_bytes=10**8)
    other = ModelRunner(model, h.runner.make_cache,
                        PrefixCache(10**8, min_tokens=4), pipelined=False)  # fmt: skip
    link = _Loopback(other)
    h.runner = h.core.runner = LeaderRunner(link, model, h.runner.make_cache, h.prefix)  # type: ignore[arg-type]
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    reqs = [
        GenerateRequest(f"r{i}", "m", prompt[: 5 + i], SamplingParams(max_tokens=6, seed=i))
        for i in range(4)
    ] + [GenerateRequest("again", "m", prompt, SamplingParams(max_tokens=4, seed=9))]
    outputs = h.run(reqs, every=2)
    assert link.plans > 10 and all(len(o) >= 4 for o in outputs.values())
    # Every finished row's KV went to both prefix caches: computed from the same inputs, the
    # sampled tokens included, it is the same on both ranks.
    mine, theirs = h.prefix._entries, other.prefix_cache._entries  # type: ignore[union-attr]
    assert mine.keys() == theirs.keys() and len(mine) >= 4
    for key, layers in mine.items():
        for (k1, v1), (k2, v2) in zip(layers, theirs[key]):
            assert mx.allclose(k1, k2, atol=1e-5) and mx.allclose(v1, v2, atol=1e-5)
    assert other.rows == [] and other.batch is None


def test_ranks_on_one_host_share_its_cores(monkeypatch, tmp_path) -> None:
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5000"]]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    share_cores(1)  # two ranks on 127.0.0.1
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS")
    share_cores(2)  # the user's choice stands
    assert os.environ["OMP_NUM_THREADS"] == "3" and "MKL_NUM_THREADS" not in os.environ


def test_rank_zero_batches_new_prompts_as_the_other_ranks_do() -> None:
    """Each prefill batch is a forward pass the other ranks run in lockstep (hidden states sent
    on, or all_sums), so rank 0 may not split or reorder a step's new prompts on its own: with
    the memory-budgeted batching a single process uses (shortest first), rows' hidden states
    went to other rows on the other ranks and answers were swapped between requests."""
    model = tiny_llama()
    h = Harness(model, budget=64)
    other = ModelRunner(model, h.runner.make_cache, None, pipelined=False)
    leader = LeaderRunner(_Loopback(other), model, h.runner.make_cache, None)  # type: ignore[arg-type]
    # As the model manager sets up every runner it makes (a budget two short prompts fill).
    leader.prefill_bytes, leader.prefill_budget = lambda rows, width, keys: rows * width, lambda: 12
    fresh: list[Any] = [
        SimpleNamespace(seq=SimpleNamespace(num_prefill=n), start=0) for n in (9, 5, 7, 6)
    ]
    assert leader._prefill_batches(fresh) == other._prefill_batches(fresh) == [fresh]
    plain = ModelRunner(model, h.runner.make_cache, None, pipelined=False)
    plain.prefill_bytes, plain.prefill_budget = leader.prefill_bytes, leader.prefill_budget
    assert len(plain._prefill_batches(fresh)) > 1  # what a single process does
