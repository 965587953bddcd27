"""One model's engine: `step()` is schedule -> execute -> update (nano-vllm's step, vLLM v1's
split). No MLX here: the runner is anything with `submit` and `reset`, so the step loop runs in
unit tests with a fake one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from engine.outputs import STEP_FAILED, RunnerOutput, SchedulerOutput, StepOutput
from engine.scheduler import Outputs, Scheduler
from engine.sequence import Sequence
from engine.types import FinishReason

log = logging.getLogger("mlxd.engine")
Emit = Callable[[Sequence, StepOutput], None]


class Pending(Protocol):
    def start(self) -> None:
        """Start computing the step if `submit` only built it (else nothing)."""
        ...

    def result(self) -> RunnerOutput:
        """Block until the step's outcome exists (starting it if need be)."""
        ...


class Runner(Protocol):
    def submit(self, out: SchedulerOutput) -> Pending:
        """Queue the step (or only build it: see Pending.start); a failure of its shared pass
        raises."""
        ...

    def reset(self) -> None:
        """Forget every row and cache (after a failed shared pass)."""
        ...

    @property
    def constrained(self) -> bool:
        """Some row decodes under a grammar (its next mask needs this step's token)."""
        ...


class EngineCore:
    """Steps one model. With `overlap`, step n+1 is submitted before step n's outcome is read
    and started after it (building a step's graph overlaps the last of the step before; a GPU
    runner queues it at once); otherwise each step is read as soon as it is queued."""

    def __init__(self, scheduler: Scheduler, runner: Runner, emit: Emit, overlap: bool = False):
        self.scheduler = scheduler
        self.runner = runner
        self.emit = emit
        self.overlap = overlap
        self._in_flight: tuple[SchedulerOutput, Pending] | None = None
        self.steps = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    @property
    def failed_rows(self) -> int:
        return self.scheduler.failed

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        seq = self.scheduler.abort(seq_id, reason)
        if seq is not None and reason is not FinishReason.ABORT:
            self.emit(seq, StepOutput([], finish_reason=reason, metrics=seq.metrics))

    def abort_all(self, reason: FinishReason = FinishReason.ABORT) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self.scheduler.abort(seq.id, reason)
            self.emit(seq, StepOutput([], finish_reason=reason, metrics=seq.metrics))

    def step(self) -> None:
        """One step. Never raises for a request: a row's own failure ends that row, a failure of
        the shared pass ends the running rows; the waiting queue is kept either way."""
        try:
            # A row drafts from its last token, so while drafts are possible each step is read
            # before the next is scheduled (overlap gives way to speculation).
            if self.overlap and not self.scheduler.speculating:
                self._step_overlapped()
            else:
                if self._in_flight is not None:
                    self._update(*self._in_flight)
                    self._in_flight = None
                out = self.scheduler.schedule()
                self._update(out, self.runner.submit(out))
        except Exception:
            running = list(self.scheduler.running)
            log.exception("engine step failed; failing its %d running rows", len(running))
            self._in_flight = None
            self.runner.reset()
            self._send(self.scheduler.fail(running, STEP_FAILED))
        self.steps += 1

    def _step_overlapped(self) -> None:
        out = self.scheduler.schedule()
        pending = self.runner.submit(out)  # step n+1 queued (or only built) ...
        previous, self._in_flight = self._in_flight, (out, pending)
        if previous is not None:
            self._update(*previous)  # ... while step n's outcome is read
        pending.start()
        if self._in_flight is not None and (not self.scheduler.running or self.runner.constrained):
            # Nothing follows it, or a grammar needs its token before the next mask: read it now.
            self._update(*self._in_flight)
            self._in_flight = None

    def _update(self, out: SchedulerOutput, pending: Pending) -> None:
        self._send(self.scheduler.update_from_output(out, pending.result()))

    def _send(self, outputs: Outputs) -> None:
        for seq, output in outputs:
            self.emit(seq, output)
