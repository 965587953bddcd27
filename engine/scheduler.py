"""Who advances this step, and by how many tokens; and every state transition its outcome
causes, in one `update_from_output` (vLLM v1's shape). No MLX: unit-tested with a fake runner."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.drafter import NgramDrafter, can_draft, fit_width, speculates
from engine.errors import QueueFullError
from engine.kv_manager import KVManager
from engine.outputs import (
    NO_MEMORY,
    Failure,
    RunnerOutput,
    Sampled,
    ScheduledSeq,
    SchedulerOutput,
    StepOutput,
)
from engine.sequence import Sequence
from engine.types import FinishReason, RequestStatus, TokenLogprob

# A prompt sharing at least this many tokens with one still prefilling waits for it, so its
# prefill can start from that prompt's cached KV (n > 1 choices, bursts with one system prompt).
log = logging.getLogger("mlxd.engine")
SHARED_PREFIX_WAIT = 32


@dataclass
class SchedulerConfig:
    # Budgets come from EngineConfig (configs/default.toml): no second copy of their defaults.
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    kv_chunk: int  # KV is reserved for what a sequence has, plus this many tokens at a time
    kv_bytes_per_token: int = 1
    context_length: int = 2048
    kv_window: int = 0  # a rotating cache keeps at most this many tokens (0: no cap)
    speculative: str = "off"  # "off", "on" or "auto" (on while the batch is small)
    speculative_tokens: int = 4  # the most tokens a row drafts in one step
    verify_positions: int = 0  # the most positions (rows x (1 + drafts)) a step verifies; 0: any


Outputs = list[tuple[Sequence, StepOutput]]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVManager,
        prefix_lookup: Callable[[list[int]], int] = lambda tokens: 0,
        eos_ids: set[int] | frozenset[int] = frozenset(),
        token_text: Callable[[int], str] = str,
    ):
        self.config = config
        self.kv = kv
        self.prefix_lookup = prefix_lookup
        self.eos_ids = eos_ids
        self.token_text = token_text  # a token's text, for logprobs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._to_release: list[Sequence] = []
        self._errors: dict[str, Failure] = {}  # finished with an error not yet reported
        self._prompt_scores: dict[str, list[TokenLogprob]] = {}  # held until the first token
        self.rejections: dict[str, int] = {}
        self.failed = 0  # requests ended by an engine error (their own, or their step's)
        self.preemptions = 0
        self.drafter = NgramDrafter(config.speculative_tokens)
        self.drafted = 0  # draft tokens verified
        self.accepted = 0  # draft tokens that held

    # --- intake ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            self.rejections["queue_full"] = self.rejections.get("queue_full", 0) + 1
            raise QueueFullError(
                f"the server is at capacity ({len(self.waiting)} requests waiting); retry shortly"
            )
        self.waiting.append(seq)

    def abort(self, seq_id: str, reason: FinishReason = FinishReason.ABORT) -> Sequence | None:
        self._prompt_scores.pop(seq_id, None)
        for seq in [*self.waiting, *self.running]:
            if seq.id == seq_id:
                self.finish(seq, reason)
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_release)

    @property
    def speculating(self) -> bool:
        """This step's decodes may carry drafts (each then needs its last token read first):
        speculation is on for this many rows and some row may draft."""
        return speculates(self.config.speculative, len(self.running)) and any(
            can_draft(s.params) for s in self.running
        )

    # --- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        # Each request advances by min(tokens still to compute, budget left) from one token
        # budget: running sequences first (decodes, then unfinished prefills, oldest first), then
        # waiting ones in arrival order while sequences, KV and budget allow. There is no separate
        # prefill mode: a long prompt is cut into chunks and never stalls the streams running.
        # KV grows as sequences do; when it runs out the youngest running ones are preempted.
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        queue = sorted(self.running, key=lambda s: s.prefilling)
        speculating = self.speculating
        while queue:
            seq = queue.pop(0)
            n = min(seq.to_compute, budget)
            if n <= 0 or (not seq.prefilling and seq.done_generating):
                continue
            if not self._grow(seq, seq.num_computed + n, queue, out):
                continue  # preempted itself, or alone and out of memory
            draft = self._draft(seq, budget - n) if speculating and n == seq.to_compute else []
            out.scheduled.append(self._advance(seq, n, draft))
            budget -= n + len(draft)
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.in_flight:
                break  # preempted with a token in flight: readmitted once it is read
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
        if speculating:
            self._fit_drafts(out)
        out.finished, self._to_release = self._to_release, []
        return out

    def _advance(self, seq: Sequence, n: int, draft: list[int] | None = None) -> ScheduledSeq:
        start = seq.num_computed
        seq.num_computed += n
        samples = seq.num_computed == seq.num_tokens
        if samples:
            seq.in_flight += 1
        draft = draft or []
        seq.num_computed += len(draft)  # the rejected ones are taken back in update_from_output
        return ScheduledSeq(
            seq, n + len(draft), start, samples, preemptions=seq.preemptions, draft=draft
        )

    # --- speculation ------------------------------------------------------------------------
    def _draft(self, seq: Sequence, room: int) -> list[int]:
        """A decoding row's guesses at its next tokens, within the step's budget, its
        max_tokens and context, and KV that is free: drafts never preempt anyone."""
        if seq.prefilling or seq.in_flight or not can_draft(seq.params):
            return []
        limit = min(
            room,
            seq.params.max_tokens - seq.num_generated - 1,
            self.config.context_length - seq.num_tokens - 1,
        )
        greedy = seq.params.greedy
        draft = (
            self.drafter.propose(seq.id, seq.all_token_ids(), limit, greedy) if limit > 0 else []
        )
        if draft and not self._reserve(seq, seq.num_computed + 1 + len(draft)):
            return []
        return draft

    def _fit_drafts(self, out: SchedulerOutput) -> None:
        """Cut drafts to the width worth verifying in this step's decode batch (the rows past
        their prefill, those ending it this step included)."""
        rows = sum(not s.prefilling for s in self.running)
        drafting = [s for s in out.scheduled if s.draft]
        drafts = [len(s.draft) for s in drafting]
        rates = [self.drafter.rate(s.seq.id) for s in drafting]
        width = fit_width(drafts, rows, self.config.verify_positions, rates)
        for sched in drafting:
            if not width:
                self.drafter.skipped(sched.seq.id)
            if len(sched.draft) > width:
                cut = len(sched.draft) - width
                sched.seq.num_computed -= cut
                sched.num_tokens -= cut
                sched.draft = sched.draft[:width]

    def _settle_draft(self, sched: ScheduledSeq, accepted: int) -> None:
        """The rejected drafts' KV is gone from the runner's cache: uncount it, and give back
        what was reserved for them beyond the usual chunk."""
        seq, drafted = sched.seq, len(sched.draft)
        accepted = min(accepted, drafted)
        seq.num_computed -= drafted - accepted
        self.drafter.observe(seq.id, drafted, accepted)
        self.drafted += drafted
        self.accepted += accepted
        keep = min(self._kv_cap(), seq.num_computed + 1 + self.config.kv_chunk)
        if seq.kv_tokens > keep:
            self.kv.release(seq.id, (seq.kv_tokens - keep) * self.config.kv_bytes_per_token)
            seq.kv_tokens = keep

    # --- KV on demand ---------------------------------------------------------------------------
    def _kv_cap(self) -> int:
        """The most KV tokens one sequence ever holds."""
        cap = self.config.context_length
        return min(cap, self.config.kv_window) if self.config.kv_window else cap

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Hold KV for `tokens` (plus a chunk, so a decode grows once every kv_chunk tokens)."""
        cap = self._kv_cap()
        if seq.kv_tokens >= min(tokens, cap):
            return True
        want = min(max(tokens, seq.kv_tokens + self.config.kv_chunk), cap)
        if not self.kv.reserve(seq.id, (want - seq.kv_tokens) * self.config.kv_bytes_per_token):
            return False
        seq.kv_tokens = want
        return True

    def _grow(
        self, seq: Sequence, tokens: int, queue: list[Sequence], out: SchedulerOutput
    ) -> bool:
        """Make room for a running sequence's next tokens, preempting the youngest running
        sequences not yet scheduled this step (vLLM's policy). False: `seq` itself can't run."""
        while not self._reserve(seq, tokens):
            if queue:
                victim = max(queue, key=self.running.index)
                queue.remove(victim)
                self._preempt(victim, out)
            elif len(self.running) > 1:
                self._preempt(seq, out)
                return False
            else:  # alone and the budget can't hold it: nothing to wait for
                self._reject(seq, during_run=True)
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free a running sequence's KV and send it back to the front of the queue; it prefills
        its prompt and output again when readmitted and goes on where it stopped."""
        self.running.remove(seq)
        self.kv.free(seq.id)
        seq.kv_tokens = seq.num_computed = 0
        seq.status = RequestStatus.WAITING
        seq.preemptions += 1
        self._prompt_scores.pop(seq.id, None)  # a prompt being scored is scored again from 0
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.preemptions += 1

    def _reject(self, seq: Sequence, during_run: bool = False) -> None:
        self.rejections["memory"] = self.rejections.get("memory", 0) + 1
        self._errors[seq.id] = NO_MEMORY
        if during_run:
            self.failed += 1
        self.finish(seq, FinishReason.ERROR)

    def _admit(self, seq: Sequence) -> bool:
        resumed = bool(seq.output_ids)
        seq.num_prefill = seq.num_prompt + len(seq.output_ids)
        if not self._reserve(seq, seq.num_prefill + self.config.kv_chunk):
            if not self.running:  # nothing will ever free room: fail it rather than wait forever
                self._reject(seq)
            return False
        # Reuse KV of an earlier prompt; at least the last prompt token is computed for logits.
        # Scoring the prompt needs its logits, so cached KV can't stand in for it.
        cached = 0 if seq.params.prompt_logprobs else self.prefix_lookup(seq.prefill_ids)
        seq.num_cached = min(cached, seq.num_prefill - 1)
        seq.num_computed = seq.num_cached
        seq.status = RequestStatus.RUNNING
        if not resumed:
            seq.metrics.cached_tokens = seq.num_cached
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
    def update_from_output(self, out: SchedulerOutput, res: RunnerOutput) -> Outputs:
        """Every transition a step's outcome causes: tokens appended, in-flight counts, stops,
        finishes, failed rows, metrics. Returns what each request's queue is sent."""
        outputs: Outputs = []
        for seq in out.finished:
            if (error := self._errors.pop(seq.id, None)) is not None:
                outputs.append((seq, self._final(seq, error)))
        now = time.monotonic()
        for sched in out.scheduled:
            seq = sched.seq
            if sched.samples:
                seq.in_flight -= 1
            if seq.status is RequestStatus.FINISHED:
                continue  # aborted or stopped while this step was in flight: its tokens drop
            if (failure := res.failed.get(seq.id)) is not None:
                outputs += self.fail([seq], failure)
                continue
            scores = res.prompt_scores.get(seq.id)
            if scores and sched.preemptions == seq.preemptions:
                held = self._prompt_scores.setdefault(seq.id, [])
                held.extend(lp for s in scores if (lp := self._logprob(s)) is not None)
            tokens = res.tokens.get(seq.id, [])
            if sched.draft:
                self._settle_draft(sched, max(0, len(tokens) - 1))
            if tokens:
                outputs.append((seq, self._append(seq, tokens, now)))
        return outputs

    def _append(self, seq: Sequence, tokens: list[Sampled], now: float) -> StepOutput:
        if not seq.first_token_at:
            seq.first_token_at = now
            seq.metrics.ttft = now - seq.request.arrival_time
            seq.metrics.prefill_time = now - seq.admitted_at
        p = seq.params
        ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        if p.max_tokens == 0:  # scoring a prompt: the sampled token is not part of the answer
            self.finish(seq, FinishReason.LENGTH)
            tokens = []
        for tok in tokens:
            if p.grammar is not None and not p.grammar.accept(tok.token):
                log.warning("request %s: the grammar rejected token %d", seq.id, tok.token)
            seq.output_ids.append(tok.token)
            ids.append(tok.token)
            if (lp := self._logprob(tok)) is not None:
                logprobs.append(lp)
            if (tok.token in self.eos_ids and not p.ignore_eos) or tok.token in p.stop_token_ids:
                self.finish(seq, FinishReason.STOP)
            elif len(seq.output_ids) >= p.max_tokens or (
                seq.num_prompt + len(seq.output_ids) >= self.config.context_length
            ):
                self.finish(seq, FinishReason.LENGTH)
            if seq.finish_reason is not None:
                break  # tokens accepted past a stop are not part of the answer
        seq.metrics.completion_tokens = len(seq.output_ids)
        done = seq.finish_reason
        return StepOutput(
            ids,
            logprobs or None,
            prompt_logprobs=self._prompt_scores.pop(seq.id, None),
            finish_reason=done,
            metrics=seq.metrics if done else None,
        )

    def _logprob(self, tok: Sampled) -> TokenLogprob | None:
        if tok.logprob is None:
            return None
        text = self.token_text
        top = [(i, text(i), lp) for i, lp in tok.top]
        return TokenLogprob(tok.token, text(tok.token), tok.logprob, top)

    def fail(self, seqs: list[Sequence], failure: Failure) -> Outputs:
        """End these requests with an error (the rest of the batch goes on)."""
        outputs: Outputs = []
        for seq in seqs:
            if seq.finish_reason is None:
                self._prompt_scores.pop(seq.id, None)
                self.finish(seq, FinishReason.ERROR)
                self.failed += 1
                outputs.append((seq, self._final(seq, failure)))
        return outputs

    @staticmethod
    def _final(seq: Sequence, error: Failure) -> StepOutput:
        return StepOutput([], finish_reason=FinishReason.ERROR, metrics=seq.metrics, error=error)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.drafter.forget(seq.id)
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.id)
            self._to_release.append(seq)
        elif seq in self.waiting:  # never admitted, or preempted (the runner holds its state)
            self.waiting.remove(seq)
            self._to_release.append(seq)
        seq.mark_finished(reason)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
