"""What a step hands on: the runner's output to the scheduler, the scheduler's to each request's
queue. Plain Python values (token ids, floats), no MLX: the scheduler consumes them in unit tests
with a fake runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.types import FinishReason, RequestMetrics, TokenLogprob


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
    their seed, their prefill): those rows end with an error, the others are unaffected."""

    tokens: dict[str, list[Sampled]] = field(default_factory=dict)
    prompt_scores: dict[str, list[Sampled]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)


@dataclass
class StepOutput:
    """What the engine thread sends a request's queue after a step (token ids, no text)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
