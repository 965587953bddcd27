"""Who advances this step, and by how many tokens (no MLX; unit-tested with a fake runner)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.errors import QueueFullError
from engine.kv_manager import KVManager
from engine.sequence import Sequence
from engine.types import FinishReason, RequestStatus

# A prompt sharing at least this many tokens with one still prefilling waits for it, so its
# prefill can start from that prompt's cached KV (n > 1 choices, bursts with one system prompt).
SHARED_PREFIX_WAIT = 32


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to compute this step
    start: int  # position of the first of them
    samples: bool  # the chunk reaches the end of the known tokens: sample the next one
    cached: int = 0  # set on a sequence's first step: prompt tokens to take from the prefix cache


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # to release from the runner's caches

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled and not self.finished


@dataclass
class SchedulerConfig:
    # Budgets come from EngineConfig (configs/default.toml): no second copy of their defaults.
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    kv_bytes_per_token: int = 1
    context_length: int = 2048
    kv_window: int = 0  # a rotating cache keeps at most this many tokens (0: no cap)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVManager,
        prefix_lookup: Callable[[list[int]], int] = lambda tokens: 0,
    ):
        self.config = config
        self.kv = kv
        self.prefix_lookup = prefix_lookup
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._to_release: list[Sequence] = []
        self.rejections: dict[str, int] = {}

    # --- intake ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            self.rejections["queue_full"] = self.rejections.get("queue_full", 0) + 1
            raise QueueFullError(
                f"the server is at capacity ({len(self.waiting)} requests waiting); retry shortly"
            )
        self.waiting.append(seq)

    def abort(self, seq_id: str, reason: FinishReason = FinishReason.ABORT) -> Sequence | None:
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                seq.mark_finished(reason)
                return seq
        for seq in self.running:
            if seq.id == seq_id:
                self.finish(seq, reason)
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_release)

    # --- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        # Each request advances by min(tokens still to compute, budget left) from one token
        # budget: running sequences first (decodes, then unfinished prefills, oldest first), then
        # waiting ones in arrival order while sequences, KV and budget allow. There is no separate
        # prefill mode: a long prompt is cut into chunks and never stalls the streams running.
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for seq in sorted(self.running, key=lambda s: s.prefilling):
            n = min(seq.to_compute, budget)
            if n <= 0 or (not seq.prefilling and seq.done_generating):
                continue
            out.scheduled.append(self._advance(seq, n))
            budget -= n
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._should_wait_for_shared_prefix(seq):
                skipped.append(self.waiting.popleft())
                continue
            if not self._admit(seq):
                break  # FIFO: nobody overtakes a request that does not fit yet
            self.waiting.popleft()
            cached = seq.num_computed
            n = min(seq.to_compute, budget)
            sched = self._advance(seq, n)
            sched.cached = cached
            out.scheduled.append(sched)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        out.finished, self._to_release = self._to_release, []
        return out

    def _advance(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed
        seq.num_computed += n
        samples = seq.num_computed == seq.num_tokens
        if samples:
            seq.in_flight += 1
        return ScheduledSeq(seq, n, start, samples)

    def _kv_tokens(self, seq: Sequence) -> int:
        tokens = min(seq.num_prompt + seq.params.max_tokens, self.config.context_length)
        return min(tokens, self.config.kv_window) if self.config.kv_window else tokens

    def _admit(self, seq: Sequence) -> bool:
        need = self._kv_tokens(seq) * self.config.kv_bytes_per_token
        if not self.kv.reserve(seq.id, need):
            if not self.running:  # nothing will ever free room: fail it rather than wait forever
                self.rejections["memory"] = self.rejections.get("memory", 0) + 1
                self.waiting.popleft()
                seq.mark_finished(FinishReason.ERROR)
                self._to_release.append(seq)
            return False
        # Reuse KV of an earlier prompt; at least the last prompt token is computed for logits.
        # Scoring the prompt needs its logits, so cached KV can't stand in for it.
        cached = 0 if seq.params.prompt_logprobs else self.prefix_lookup(seq.prompt_ids)
        seq.num_cached = min(cached, seq.num_prompt - 1)
        seq.num_computed = seq.num_cached
        seq.metrics.cached_tokens = seq.num_cached
        seq.status = RequestStatus.RUNNING
        seq.admitted_at = time.monotonic()
        seq.metrics.queue_time = seq.admitted_at - seq.request.arrival_time
        self.running.append(seq)
        return True

    def _should_wait_for_shared_prefix(self, seq: Sequence) -> bool:
        for other in self.running:
            if other.prefilling and _common_prefix(other.prompt_ids, seq.prompt_ids) >= max(
                SHARED_PREFIX_WAIT, seq.num_computed + 1
            ):
                return True
        return False

    # --- results ------------------------------------------------------------------------------
    def append_token(self, seq: Sequence, token: int, eos_ids: set[int]) -> None:
        """Record a token read back from the runner; finish the sequence if it must stop."""
        seq.in_flight -= 1
        if seq.status is RequestStatus.FINISHED:
            return  # sampled in flight after an abort or stop: dropped
        p = seq.params
        if p.max_tokens == 0:  # scoring a prompt: the sampled token is not part of the answer
            self.finish(seq, FinishReason.LENGTH)
            return
        seq.output_ids.append(token)
        if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish(seq, FinishReason.STOP)
        elif len(seq.output_ids) >= p.max_tokens or seq.num_prompt + len(seq.output_ids) >= (
            self.config.context_length
        ):
            self.finish(seq, FinishReason.LENGTH)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.id)
            self._to_release.append(seq)
        seq.mark_finished(reason)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
