"""The step loop with a fake runner: no MLX, the real Scheduler.update_from_output."""

import subprocess
import sys

import pytest

from engine.core import EngineCore
from engine.kv_manager import KVManager
from engine.outputs import ROW_FAILED, RunnerOutput, Sampled, SchedulerOutput, StepOutput
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.types import FinishReason, GenerateRequest, SamplingParams

EOS = 0


class FakeRunner:
    """'Samples' 100 + the token's index in the output for each sampling row; can return
    several tokens a row, fail one row, or raise on a chosen step."""

    def __init__(self, per_row: int = 1, fail_row: str = "", raise_on_step: int = -1):
        self.per_row, self.fail_row, self.raise_on_step = per_row, fail_row, raise_on_step
        self.submitted = 0
        self.resets = 0
        self.constrained = False  # no grammar rows

    def submit(self, out: SchedulerOutput) -> "FakePending":
        self.submitted += 1
        if self.submitted == self.raise_on_step:
            raise RuntimeError("injected shared-pass fault")
        res = RunnerOutput()
        for x in out.scheduled:
            if x.seq.id == self.fail_row and x.seq.output_ids:
                res.failed[x.seq.id] = ROW_FAILED
            elif x.samples:
                base = 99 + x.seq.num_generated  # this token counts as in flight
                res.tokens[x.seq.id] = [Sampled(base + i) for i in range(self.per_row)]
        return FakePending(res)

    def reset(self) -> None:
        self.resets += 1


class FakePending:
    def __init__(self, res: RunnerOutput):
        self.res = res

    def start(self) -> None:
        pass

    def result(self) -> RunnerOutput:
        return self.res


def engine(runner: FakeRunner, overlap: bool = False, max_seqs: int = 8, kv: int = 10**6):
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=64,
        max_waiting=64,
        context_length=1000,
        kv_chunk=2,
    )
    sent: dict[str, list[StepOutput]] = {}
    core = EngineCore(
        Scheduler(cfg, KVManager(kv), eos_ids={EOS}),
        runner,
        lambda seq, out: sent.setdefault(seq.id, []).append(out),
        overlap=overlap,
    )
    return core, sent


def add(core: EngineCore, rid: str, n_prompt: int = 5, max_tokens: int = 6, **kw) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    seq = Sequence(GenerateRequest(rid, "m", list(range(1, n_prompt + 1)), params))
    core.add(seq)
    return seq


def run(core: EngineCore) -> None:
    for _ in range(200):
        if not core.has_work:
            return
        core.step()
    raise AssertionError("did not finish")


def tokens(sent: dict[str, list[StepOutput]]) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in sent.items()}


@pytest.mark.parametrize("overlap", [False, True], ids=["read-now", "overlapped"])
def test_step_loop_streams_and_finishes(overlap):
    core, sent = engine(FakeRunner(), overlap)
    a, b = add(core, "a"), add(core, "b", max_tokens=3)
    run(core)
    assert tokens(sent) == {"a": list(range(100, 106)), "b": [100, 101, 102]}
    assert sent["a"][-1].finish_reason is FinishReason.LENGTH
    assert a.in_flight == b.in_flight == 0 and not core.scheduler.running
    assert core.scheduler.kv.used_bytes == 0


def test_overlap_reads_a_step_late_and_counts_in_flight():
    core, sent = engine(FakeRunner(), overlap=True)
    a = add(core, "a", max_tokens=10)
    add(core, "b", max_tokens=10)
    core.step()  # prefill + first decode queued, not read
    assert a.in_flight == 1 and "a" not in sent
    core.step()  # step 2 queued, step 1 read
    assert a.in_flight == 1 and tokens(sent)["a"] == [100]
    assert a.num_tokens == 5 + 1 + 1  # prompt, one read, one in flight


def test_several_tokens_a_row_stop_at_the_first_stop():
    core, sent = engine(FakeRunner(per_row=3))
    add(core, "a", max_tokens=20, stop_token_ids=[104])
    run(core)
    # 100, 101, 102 | 103, 104 (stop: the 105 accepted with it is dropped)
    assert tokens(sent)["a"] == [100, 101, 102, 103, 104]
    assert sent["a"][-1].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("overlap", [False, True], ids=["read-now", "overlapped"])
def test_a_failed_row_ends_alone(overlap):
    core, sent = engine(FakeRunner(fail_row="b"), overlap)
    add(core, "a")
    add(core, "b")
    run(core)
    assert tokens(sent)["a"] == list(range(100, 106))
    assert sent["b"][-1].finish_reason is FinishReason.ERROR and sent["b"][-1].error == ROW_FAILED
    assert core.failed_rows == 1


@pytest.mark.parametrize("overlap", [False, True], ids=["read-now", "overlapped"])
def test_a_failed_shared_pass_ends_the_running_and_keeps_the_queue(overlap):
    runner = FakeRunner(raise_on_step=3)
    core, sent = engine(runner, overlap, max_seqs=2)
    for rid in "abcd":
        add(core, rid, max_tokens=4)
    run(core)
    finals = {rid: outs[-1].finish_reason for rid, outs in sent.items()}
    assert finals == {
        "a": FinishReason.ERROR,
        "b": FinishReason.ERROR,
        "c": FinishReason.LENGTH,
        "d": FinishReason.LENGTH,
    }
    assert tokens(sent)["c"] == [100, 101, 102, 103] and runner.resets == 1
    # Not those requests' fault: the engine could not serve them now (a 503, retry).
    assert {sent[rid][-1].error.kind for rid in "ab"} == {"unavailable"}
    assert core.failed_rows == 2


@pytest.mark.parametrize("overlap", [False, True], ids=["read-now", "overlapped"])
def test_preempted_streams_lose_and_repeat_nothing(overlap):
    roomy, _ = engine(FakeRunner(), overlap)
    tight, sent = engine(FakeRunner(), overlap, kv=40)
    for core in (roomy, tight):
        for i, rid in enumerate("abcdef"):
            add(core, rid, n_prompt=3 + i, max_tokens=12)
        run(core)
    assert tight.scheduler.preemptions > 0
    assert tokens(sent) == {rid: list(range(100, 112)) for rid in "abcdef"}
    assert all(outs[-1].finish_reason is FinishReason.LENGTH for outs in sent.values())
    assert tight.scheduler.kv.used_bytes == 0


def test_the_step_loop_and_scheduler_import_no_mlx():
    code = (
        "import sys, engine.core, engine.scheduler, engine.drafter, engine.outputs, engine.kv_manager; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
