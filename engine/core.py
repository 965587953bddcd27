"""One model's engine: `step()` is schedule -> execute -> update."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.runner import ModelRunner, StepResult, token_logprob
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.types import FinishReason, RequestMetrics, TokenLogprob


@dataclass
class StepOutput:
    """What the engine thread sends a request's queue after a step (token ids, no text)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None


log = logging.getLogger("mlxd.engine")

Emit = Callable[[Sequence, StepOutput], None]


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        eos_ids: set[int],
        emit: Emit,
        token_text: Callable[[int], str] = str,
    ):
        self.scheduler = scheduler
        self.runner = runner
        self.eos_ids = eos_ids
        self.emit = emit
        self.token_text = token_text
        self._in_flight: StepResult | None = None
        self._prompt_scores: dict[str, list[TokenLogprob]] = {}  # held until the first token
        self.steps = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        self._prompt_scores.pop(seq_id, None)
        seq = self.scheduler.abort(seq_id, reason)
        if seq is not None and reason is not FinishReason.ABORT:
            self.emit(seq, StepOutput([], finish_reason=reason, metrics=seq.metrics))

    def step(self) -> None:
        out = self.scheduler.schedule()
        result = self.runner.execute(out)  # queued with async_eval
        self._report_rejected(out.finished)
        if not self.runner.pipelined:
            if not result.empty:
                self.update(result)
            self.steps += 1
            return
        previous, self._in_flight = self._in_flight, (None if result.empty else result)
        if previous is not None:
            self.update(previous)  # step n's tokens, read while step n+1 computes
        if self._in_flight is not None and (not self.scheduler.running or self.runner.constrained):
            # Nothing follows it, or a grammar needs its token before the next mask: read it now.
            self.update(self._in_flight)
            self._in_flight = None
        self.steps += 1

    def update(self, result: StepResult) -> None:
        for scores in result.prompt_scores:
            held = self._prompt_scores.setdefault(scores.seq.id, [])
            held.extend(lp for t in scores.read() if (lp := token_logprob(t, self.token_text)))
        now = time.monotonic()
        for tok in result.read():
            seq = tok.seq
            if seq.finish_reason is not None:
                seq.in_flight -= 1
                continue  # aborted or stopped while this token was in flight
            if not seq.first_token_at:
                seq.first_token_at = now
                seq.metrics.ttft = now - seq.request.arrival_time
                seq.metrics.prefill_time = now - seq.admitted_at
            if seq.params.grammar is not None and not seq.params.grammar.accept(tok.token):
                log.warning("request %s: the grammar rejected token %d", seq.id, tok.token)
            self.scheduler.append_token(seq, tok.token, self.eos_ids)
            seq.metrics.completion_tokens = len(seq.output_ids)
            lp = token_logprob(tok, self.token_text)
            done = seq.finish_reason
            scoring_only = seq.params.max_tokens == 0  # the token was sampled only to end prefill
            self.emit(
                seq,
                StepOutput(
                    [] if scoring_only else [tok.token],
                    [lp] if lp is not None and not scoring_only else None,
                    prompt_logprobs=self._prompt_scores.pop(seq.id, None),
                    finish_reason=done,
                    metrics=seq.metrics if done else None,
                ),
            )

    def _report_rejected(self, finished: list[Sequence]) -> None:
        for seq in finished:
            if seq.finish_reason is FinishReason.ERROR and not seq.output_ids:
                self.emit(
                    seq,
                    StepOutput(
                        [],
                        finish_reason=FinishReason.ERROR,
                        metrics=seq.metrics,
                        error="not enough memory for this request's KV cache",
                    ),
                )

    def abort_all(self, reason: FinishReason = FinishReason.ABORT) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self.scheduler.abort(seq.id, reason)
            self.emit(seq, StepOutput([], finish_reason=reason, metrics=seq.metrics))
