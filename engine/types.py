"""Typed values that cross the engine's boundary. No MLX here: the scheduler and the server use them."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.output.events import OutputSpec, ToolCall, ToolCallDelta


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # the client went away or the server is shutting down
    ERROR = "error"  # the engine failed on this request


# Whose fault a failed request is: its own (a 400), the engine's (a 500), or the engine can't
# serve it now (a 503: a failed shared pass, no memory; retrying may work).
FailureKind = Literal["request", "internal", "unavailable"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


SEED_SPACE = 2**64  # seeds are folded onto [0, 2**64): the PRNG's key space


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it stops. Defaults are the OpenAI API's."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off (multiplicative, as in llama.cpp / HF)
    repeat_last_n: int = 64  # window the penalties look back over; -1: whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20 alternatives per token
    # Per-request hooks, mlx-lm's signature: (token_ids: mx.array, logits: mx.array[1, V]) ->
    # logits. token_ids holds the prompt and the tokens so far. Structured output plugs in here.
    logits_processors: list[Callable[[Any, Any], Any]] = field(default_factory=list)
    prompt_logprobs: bool = False  # score the prompt too: the first output carries prompt_logprobs
    # A llguidance matcher constraining the output (engine/grammar.py); set by the engine.
    grammar: Any = None

    def __post_init__(self) -> None:
        # Any integer seed names a stream: folded onto the PRNG's 64-bit key space here, so the
        # sampler never sees one it cannot turn into a key (-1 and 2**64 - 1 draw alike).
        if self.seed is not None:
            self.seed = int(self.seed) % SEED_SPACE
        # A window past any context is the whole context; MLX slices take 32-bit indices only.
        if self.repeat_last_n >= 2**31:
            self.repeat_last_n = -1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class GenerateRequest:
    """What the server hands the engine: a tokenized prompt and how to continue it."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    keep_alive: float | None = (
        None  # seconds; None: the model's default, <0: forever, 0: unload after
    )
    arrival_time: float = field(default_factory=time.monotonic)
    # Chat requests: tools, JSON answers and reasoning (None: plain text, e.g. raw completions).
    output: OutputSpec | None = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (may be a partial UTF-8 sequence rendered with U+FFFD)
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class RequestMetrics:
    """Timings and counts of one request; durations in seconds."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of the completion tokens, those inside the thinking block
    load_time: float = 0.0
    queue_time: float = 0.0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    ttft: float = 0.0
    total_time: float = 0.0

    @property
    def prefill_tps(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_time if self.prefill_time > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.completion_tokens / self.decode_time if self.decode_time > 0 else 0.0


@dataclass
class RequestOutput:
    """One increment of a request's stream, as the async side sees it.

    `text` is the newly decoded answer text (always whole UTF-8 characters, never part of a stop
    string or of tool-call or reasoning markup); `reasoning` the model's new thinking text;
    `tool_calls` the calls completed in this increment, `call_deltas` the calls' pieces as they
    stream (a call's pieces come before or with its completion). `finish_reason` is set exactly
    once, on the last output, together with `metrics`.
    """

    request_id: str
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = (
        None  # prompt tokens 1..n-1 (params.prompt_logprobs)
    )
    finish_reason: FinishReason | None = None
    stop_matched: str | int | None = None  # the stop string or token that ended the request
    metrics: RequestMetrics | None = None
    error: str | None = None  # set with FinishReason.ERROR
    error_kind: FailureKind = "internal"  # with `error`: whose fault it is
    call_deltas: list[ToolCallDelta] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ModelStatus:
    """A model the registry knows of, loaded or not (from disk metadata, no weights read)."""

    name: str
    architecture: str
    parameters: int
    context_length: int
    quantization: str  # e.g. "q4_1 (4-bit, group 32)", "f16", "none"
    size_bytes: int  # on disk
    modified_at: float  # unix time
    family: str = ""
    digest: str = ""
    loaded: bool = False
    weight_bytes: int = 0  # in memory, when loaded
    weight_format: str = ""  # what the loader chose: "fp32 (dequantized)", "as stored", ...
    expires_at: float | None = (
        None  # unix time the model unloads when idle; None: never or not loaded
    )
    active_requests: int = 0


@dataclass
class RankStatus:
    """One rank of a distributed group, as its last heartbeat reported it."""

    rank: int
    pid: int = 0
    weight_bytes: int = 0  # this rank's resident weights (its share of the model)
    active_bytes: int = 0  # MLX active memory
    peak_bytes: int = 0
    kv_tokens: int = 0  # tokens of KV its own budget holds (its share of each token's KV)


@dataclass
class GroupStatus:
    """The group one model is served across (`mlxd serve --distributed`)."""

    mode: str  # "tensor" | "pipeline"
    model: str
    split: str  # what each rank holds, in words
    ranks: list[RankStatus] = field(default_factory=list)
    failed: str = ""  # why the group failed ("" while it serves)


@dataclass
class EngineStats:
    """A snapshot for /metrics and /api/ps."""

    running: int = 0
    waiting: int = 0
    kv_bytes: int = 0
    kv_budget_bytes: int = 0
    kv_reserved_bytes: int = 0  # admission's count: the sequences' own tokens plus a chunk each
    prefix_cache_bytes: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    steps: int = 0
    failed_requests: int = 0  # requests the engine ended with an error (theirs or their step's)
    preemptions: int = 0  # running sequences sent back to the queue to free KV
    drafted_tokens: int = 0  # speculative decoding: draft tokens verified ...
    accepted_tokens: int = 0  # ... and those that held
    rss_bytes: int = 0  # the process's resident memory
    mlx_active_bytes: int = 0
    mlx_peak_bytes: int = 0
    mlx_cache_bytes: int = 0
    mlx_cache_limit_bytes: int = 0
    memory_releases: int = 0  # times the idle engine gave MLX's cache and free heap pages back
    rejections: dict[str, int] = field(default_factory=dict)
    loaded: list[ModelStatus] = field(default_factory=list)
    group: GroupStatus | None = None  # set when serving across ranks


@dataclass
class EngineConfig:
    """Everything the engine and its model registry need. No defaults here: the server fills it
    from its settings, whose one table of defaults is configs/default.toml."""

    models_dir: Path
    default_model: str
    keep_alive: float  # seconds an idle model stays loaded; <0 forever
    preload: list[str]
    pinned: list[str]
    memory_limit: int  # bytes for weights + KV; 0: a safe fraction of the device's memory
    weights_on_cpu: str  # CPU backend: "fp32" (dequantize at load) or "as_stored"
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    max_context: int  # 0: the model's own context length
    prefix_cache_bytes: int
    kv_fraction: float
    speculative: str  # "off", "on" or "auto": n-gram drafts verified in the batch
    speculative_tokens: int  # the most tokens one row drafts a step
    kv_chunk: int  # tokens of KV a sequence reserves at a time as it grows
    mlx_cache_limit: int  # bytes of freed buffers MLX keeps for reuse; 0: what a step needs
    idle_release: float  # seconds idle before MLX's cache and free heap pages go back; <0 never
    distributed: str  # "": one process; "tensor" | "pipeline": one model across mlx.launch's ranks
    dist_step_timeout: (
        float  # seconds a step or heartbeat may take before the group counts as failed
    )
