"""The one job runner: every API's request becomes a Job; its outputs, one stream rendered per API.

An API module (OpenAI chat or completions, Ollama chat or generate; later Anthropic messages
and OpenAI responses) holds only its mapping: request body -> Job (tokenized prompts and typed
SamplingParams, one GenerateRequest per choice) and a Renderer (the output stream -> that API's
chunks and its non-streamed body). `respond()` does the rest the same way for all of them:
- runs the job's engine requests concurrently (choice order kept, early exit aborts them all);
- streamed: waits for the first output before sending headers, so a rejection (queue full,
  unknown model, context) is still an HTTP status; then frames chunks (server/sse.py) with
  keep-alives and ends a failure in-band, in the API's error shape;
- not streamed: collects the answer while watching the connection; a client that goes away
  aborts the engine requests (their rows freed) and gets no body.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from engine.api import EngineAPI
from engine.output.events import ToolCall
from engine.types import (
    FinishReason,
    GenerateRequest,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from server.concurrency import ClientGone, merged, prime, unless_disconnected
from server.errors import API, APIError, error_body
from server.settings import Settings
from server.sse import Framing, framed_response

Event = dict[str, Any]


@dataclass
class Job:
    """One internal request, whatever API it came from: n samples of each prompt.

    `requests` are prompt-major: choice index = prompt index * n + sample index.
    """

    id: str
    model: str
    requests: list[GenerateRequest]
    n: int = 1
    started: float = field(default_factory=time.monotonic)
    load_time: float = 0.0  # seconds get_model spent loading the model for it (ModelHandle)


@dataclass
class Choice:
    """What one choice has produced so far (all of it, once `finish_reason` is set)."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_matched: str | int | None = None  # the stop string or token that ended it
    metrics: RequestMetrics | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.reasoning += out.reasoning
        self.tool_calls.extend(out.tool_calls)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_matched = out.stop_matched
            self.metrics = out.metrics


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0  # of the completion tokens, those the model spent thinking

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class JobResult:
    """The job's choices, filled in as outputs arrive (complete when the stream has ended)."""

    job: Job
    choices: list[Choice]

    @classmethod
    def start(cls, job: Job) -> JobResult:
        return cls(job, [Choice(i) for i in range(len(job.requests))])

    @property
    def metrics(self) -> list[RequestMetrics | None]:
        return [c.metrics for c in self.choices]

    def usage(self) -> Usage:
        """Each prompt counted once; its cached share from the best of its samples."""
        n, reqs = self.job.n, self.job.requests
        prompt = sum(len(reqs[p].prompt_token_ids) for p in range(0, len(reqs), n))
        cached = sum(
            max((c.metrics.cached_tokens for c in self.choices[p : p + n] if c.metrics), default=0)
            for p in range(0, len(reqs), n)
        )
        completion = sum(
            c.metrics.completion_tokens if c.metrics else len(c.token_ids) for c in self.choices
        )
        reasoning = sum(c.metrics.reasoning_tokens for c in self.choices if c.metrics)
        return Usage(prompt, cached, completion, reasoning)


class Renderer(Protocol):
    """One API's rendering of a job's output stream. `api` picks the framing and error shape."""

    api: API

    def opening(self) -> Iterable[Event]:
        """Chunks sent once the first output is ready, before it."""
        ...

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[Event]:
        """Chunks for one output; `choice` already includes it."""
        ...

    def closing(self, result: JobResult) -> Iterable[Event]:
        """Chunks after every choice has finished (e.g. a usage chunk)."""
        ...

    def body(self, result: JobResult) -> Event:
        """The whole non-streamed response."""
        ...

    def heartbeat(self) -> Event | None:
        """What an idle stream sends as keep-alive: an NDJSON line or a typed SSE event (None:
        SSE's comment line)."""
        ...


def raise_if_failed(out: RequestOutput) -> None:
    """An ERROR or ABORT finish becomes an APIError: the response's status when it comes before
    the first output, else framed in-band. The status says whose fault it was."""
    if out.finish_reason == FinishReason.ERROR:
        message = out.error or "the engine failed on this request"
        if out.error_kind == "request":
            raise APIError(400, message, code="invalid_request")
        if out.error_kind == "unavailable":
            raise APIError(503, message, code="engine_unavailable", retry_after=5)
        raise APIError(500, message, code="engine_error")
    if out.finish_reason == FinishReason.ABORT:
        raise APIError(
            503,
            "the request was aborted: the server is shutting down",
            code="aborted",
            retry_after=5,
        )


OnEnd = Callable[[JobResult, str], None]


async def run(
    engine: EngineAPI, result: JobResult, on_end: OnEnd | None = None
) -> AsyncGenerator[tuple[RequestOutput, Choice], None]:
    """The job's outputs as they arrive, each added to its choice in `result`; failures raise.
    max_tokens 0 with nothing to score never reaches the engine. `on_end(result, outcome)` is
    called once the job is over: stop / length / abort / error."""
    outcome = "abort"  # unless the job finishes or fails: the consumer left early
    try:
        async for item in _outputs(engine, result):
            yield item
        outcome = _outcome(result)
    except Exception as exc:
        outcome = "abort" if getattr(exc, "code", None) == "aborted" else "error"
        raise
    finally:
        if on_end is not None:
            on_end(result, outcome)


async def _outputs(
    engine: EngineAPI, result: JobResult
) -> AsyncIterator[tuple[RequestOutput, Choice]]:
    requests = result.job.requests
    if all(r.params.max_tokens == 0 and not r.params.prompt_logprobs for r in requests):
        for i, r in enumerate(requests):
            metrics = RequestMetrics(prompt_tokens=len(r.prompt_token_ids))
            out = RequestOutput(r.request_id, finish_reason=FinishReason.LENGTH, metrics=metrics)
            result.choices[i].add(out)
            yield out, result.choices[i]
        return
    # aclosing: closing this generator (client gone) closes merged() now, aborting the requests.
    async with aclosing(merged(engine, requests)) as outputs:
        async for i, out in outputs:
            raise_if_failed(out)
            result.choices[i].add(out)
            yield out, result.choices[i]


def _outcome(result: JobResult) -> str:
    reasons = {c.finish_reason for c in result.choices}
    return "length" if FinishReason.LENGTH in reasons else "stop"


class JobObserver(Protocol):
    """Who hears of every job's end (server/metrics.py); `app.state.metrics` when installed."""

    def job_ended(self, request: Request, result: JobResult, outcome: str) -> None: ...


def _on_end(request: Request) -> OnEnd | None:
    observer: JobObserver | None = getattr(request.app.state, "metrics", None)
    if observer is None:
        return None
    return lambda result, outcome: observer.job_ended(request, result, outcome)


async def render(
    renderer: Renderer,
    outputs: AsyncIterator[tuple[RequestOutput, Choice]],
    result: JobResult,
) -> AsyncIterator[Event]:
    """The renderer's chunks for an output stream (which `run` fills `result` from)."""
    first = True
    async with aclosing(outputs):  # type: ignore[type-var]
        async for out, choice in outputs:
            if first:
                first = False
                for event in renderer.opening():
                    yield event
            for event in renderer.chunks(out, choice):
                yield event
    for event in renderer.closing(result):
        yield event


def job_events(engine: EngineAPI, job: Job, renderer: Renderer) -> AsyncIterator[Event]:
    """A job's rendered chunks without HTTP (the CLI's in-process mode iterates these)."""
    result = JobResult.start(job)
    return render(renderer, run(engine, result), result)


async def collect(engine: EngineAPI, job: Job, on_end: OnEnd | None = None) -> JobResult:
    result = JobResult.start(job)
    async with aclosing(run(engine, result, on_end)) as outputs:
        async for _ in outputs:
            pass
    return result


async def respond(request: Request, job: Job, renderer: Renderer, stream: bool) -> Response:
    """Run `job` for an HTTP request: a framed stream, or one JSON body (see the module doc)."""
    engine, on_end = engine_of(request), _on_end(request)
    if stream:
        result = JobResult.start(job)
        outputs = await prime(run(engine, result, on_end), keepalive_of(request))
        return stream_response(request, renderer.api, render(renderer, outputs, result), renderer)
    try:
        done = await unless_disconnected(request, collect(engine, job, on_end))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(renderer.body(done))


async def respond_events(
    request: Request, api: API, events: AsyncIterator[Event], stream: bool
) -> Response:
    """For work that is not a job (pulls, imports): stream its events, or answer with the last
    one. The first event is awaited before headers, as for jobs."""
    primed = await prime(events, keepalive_of(request))
    if stream:
        return stream_response(request, api, primed, None)
    last: Event = {}
    async for event in primed:
        last = event
    return JSONResponse(last)


# Ollama: NDJSON; OpenAI chat: `data:` frames and [DONE]; Anthropic: named events; OpenAI
# Responses: named events with a sequence_number.
FRAMING: dict[API, Framing] = {
    "ollama": "ndjson",
    "openai": "sse",
    "anthropic": "typed-sse",
    "responses": "numbered-sse",
}


def stream_response(
    request: Request, api: API, events: AsyncIterator[Event], renderer: Renderer | None
) -> Response:
    """Frame `events` in `api`'s stream format; an exception becomes its last frame."""
    heartbeat = renderer.heartbeat() if renderer is not None else None
    return framed_response(
        FRAMING[api],
        events,
        lambda exc: error_body(api, exc),
        keepalive_of(request),
        heartbeat,
    )


# --- what handlers read from the app ------------------------------------------------------------


def engine_of(request: Request) -> EngineAPI:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def keepalive_of(request: Request) -> float:
    """Seconds of silence before a stream sends a keep-alive (tests shorten it)."""
    return float(request.app.state.keepalive_seconds)
