"""What a step hands on: the scheduler's output to the runner (who runs, which tokens), the
runner's to the scheduler, the scheduler's to each request's queue. Plain Python values (token
ids, floats), no MLX: the scheduler consumes them in unit tests with a fake runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InsufficientMemoryError, InvalidRequestError
from engine.sequence import Sequence
from engine.types import FailureKind, FinishReason, RequestMetrics, TokenLogprob


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: which of its tokens the runner computes."""

    seq: Sequence
    num_tokens: int  # tokens to compute this step
    start: int  # position of the first of them
    samples: bool  # the chunk reaches the end of the known tokens: sample the next one
    cached: int = 0  # set on a sequence's first step: prompt tokens to take from the prefix cache
    preemptions: int = 0  # the sequence's count when scheduled: prompt scores of an older run drop
    # Guessed next tokens, computed after the row's last known token and verified in this pass
    # (counted in num_tokens); the runner returns the accepted ones and the token after them.
    draft: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """A step as the scheduler decided it: the runner's whole input (vLLM v1's shape)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # to release from the runner's caches
    # Sent back to the queue to free their KV: the runner drops their caches, keeps their
    # sampling state; they prefill again (prompt and output so far) when readmitted.
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled and not self.finished and not self.preempted


@dataclass(frozen=True)
class Failure:
    """Why a request ended with an error: whose fault (the HTTP status) and what to tell it."""

    kind: FailureKind
    message: str


ROW_FAILED = Failure("internal", "the engine failed on this request")
STEP_FAILED = Failure("unavailable", "the engine failed on a batch holding this request; retry it")
NO_MEMORY = Failure("unavailable", "not enough memory for this request's KV cache; retry later")
BAD_PARAMS = Failure("request", "this request's sampling parameters cannot be used")


def row_failure(exc: BaseException, setup: bool = False) -> Failure:
    """A row's own exception as a Failure. `setup`: it came from turning the request's sampling
    parameters into sampler state, which only the request's values can break."""
    if isinstance(exc, InvalidRequestError):
        return Failure("request", str(exc))
    if isinstance(exc, MemoryError | InsufficientMemoryError):
        return NO_MEMORY
    if setup and isinstance(exc, ValueError | TypeError | OverflowError):
        return BAD_PARAMS
    return ROW_FAILED


@dataclass
class Sampled:
    """One token a row produced, with its log-probability and alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RunnerOutput:
    """The outcome of one executed step, keyed by sequence id.

    `tokens` lists a row's new tokens in order: one per sampling row, more when draft tokens
    were verified and accepted in the same pass. `prompt_scores` holds log-probabilities of
    prompt tokens a chunk scored. `failed` names rows whose own part failed (their sampler,
    their seed, their prefill) and why: those rows end with an error, the others are
    unaffected."""

    tokens: dict[str, list[Sampled]] = field(default_factory=dict)
    prompt_scores: dict[str, list[Sampled]] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)


@dataclass
class StepOutput:
    """What the engine thread sends a request's queue after a step (token ids, no text)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None
    error: Failure | None = None
