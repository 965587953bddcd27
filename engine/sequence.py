"""A request's state inside the engine (no MLX): tokens known, tokens computed, tokens in flight."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.types import (
    FinishReason,
    GenerateRequest,
    RequestMetrics,
    RequestStatus,
    SamplingParams,
)


@dataclass
class Sequence:
    """One generation stream.

    Token accounting (the scheduler's whole view of progress):
      tokens = prompt + output (known ids) + `in_flight` sampled tokens whose ids the engine thread
      has not read yet (steps are pipelined: step n+1 is queued before step n's tokens are read).
      `num_computed` counts tokens whose KV is in the cache. Tokens still to compute =
      num_tokens - num_computed: the prompt's remainder while prefilling, 1 while decoding.
      A chunk that reaches the prompt's end samples: its last token is decoded in the batch.
      `num_prefill` is what a prefill computes: the prompt, or the prompt and the tokens it
      had generated when it was preempted (its KV is recomputed on return).
    """

    request: GenerateRequest
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens taken from the prefix cache
    num_prefill: int = 0
    kv_tokens: int = 0  # KV reserved for this many tokens
    preemptions: int = 0
    in_flight: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.num_prefill = self.num_prefill or len(self.request.prompt_token_ids)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def prefill_ids(self) -> list[int]:
        return self.all_token_ids()[: self.num_prefill]

    @property
    def num_tokens(self) -> int:
        return self.num_prompt + len(self.output_ids) + self.in_flight

    @property
    def to_compute(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def num_generated(self) -> int:
        """Generated tokens, including those still in flight."""
        return len(self.output_ids) + self.in_flight

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prefill

    @property
    def done_generating(self) -> bool:
        """No more tokens need sampling: max_tokens reached (counting those in flight)."""
        return self.num_generated >= self.params.max_tokens

    def all_token_ids(self) -> list[int]:
        return [*self.request.prompt_token_ids, *self.output_ids]

    def mark_finished(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
        self.status = RequestStatus.FINISHED
        now = time.monotonic()
        m = self.metrics
        m.total_time = now - self.request.arrival_time
        if self.first_token_at:
            m.decode_time = now - self.first_token_at
