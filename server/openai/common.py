"""What chat and completions share: limits, sampling params, running n engine requests, usage."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from engine.api import EngineAPI
from engine.types import (
    FinishReason,
    GenerateRequest,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from server.errors import APIError
from server.openai.protocol import SamplingFields
from server.settings import Settings

T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def stop_list(req: SamplingFields, settings: Settings) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > settings.max_stop_strings:
        raise APIError(
            400, f"at most {settings.max_stop_strings} stop strings are allowed", param="stop"
        )
    return [s for s in stops if s]


def resolve_max_tokens(requested: int | None, prompt_len: int, context: int, param: str) -> int:
    """The completion budget; 400 context_length_exceeded when prompt + budget exceeds the context.
    Absent, the budget is what the context has left (at least one token must fit)."""
    wanted = max(context - prompt_len, 1) if requested is None else requested
    if prompt_len + wanted > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} for the "
            "completion). Please reduce the length of the prompt or the completion.",
            param=param,
            code="context_length_exceeded",
        )
    return wanted


def logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (raw or {}).items():
        if not key.isdigit():
            raise APIError(
                400, f"logit_bias keys must be token ids, got '{key[:32]}'", param="logit_bias"
            )
        out[int(key)] = value
    return out


def sampling_params(
    req: SamplingFields,
    settings: Settings,
    max_tokens: int,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """The engine's typed params from the request (OpenAI defaults where a field is absent)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias(req.logit_bias),
        seed=req.seed,
        stop=stop_list(req, settings),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def with_seed(params: SamplingParams, i: int, **changes: Any) -> SamplingParams:
    """A copy of params for choice i: seeds differ per choice so n samples differ but reproduce."""
    seed = None if params.seed is None else params.seed + i
    return SamplingParams(**{**params.__dict__, "seed": seed, **changes})


# --- running requests --------------------------------------------------------------------------


@dataclass
class ChoiceResult:
    """Everything one finished choice produced."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.metrics = out.metrics


def raise_if_failed(out: RequestOutput) -> None:
    """An ERROR or ABORT finish becomes an APIError (mid-stream, sse.py frames it in-band)."""
    if out.finish_reason == FinishReason.ERROR:
        raise APIError(500, out.error or "the engine failed on this request", code="engine_error")
    if out.finish_reason == FinishReason.ABORT:
        raise APIError(
            503,
            "the request was aborted: the server is shutting down",
            code="aborted",
            retry_after=5,
        )


async def merged(
    engine: EngineAPI, requests: list[GenerateRequest]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run the requests concurrently; yield (choice index, output) as outputs arrive.

    Leaving early (break, aclose, cancellation) cancels every pump, which closes each engine
    iterator and so aborts its request.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, request: GenerateRequest) -> None:
        try:
            gen = engine.generate(request)
            async with contextlib.aclosing(gen):  # type: ignore[type-var]
                async for out in gen:
                    await queue.put((i, out))
            await queue.put((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


class Primed:
    """An async iterator whose first item was already requested (see `prime`)."""

    def __init__(self, first: asyncio.Future[Any], source: AsyncIterator[Any]) -> None:
        self._first: asyncio.Future[Any] | None = first
        self._source = source

    def __aiter__(self) -> Primed:
        return self

    async def __anext__(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return await first
        return await self._source.__anext__()

    async def aclose(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.cancel()
            with contextlib.suppress(BaseException):
                await self._first
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()


async def prime(source: AsyncIterator[T], timeout: float) -> Primed:
    """Wait up to `timeout` for the first item so a rejection (queue full, context, ...) is still
    an HTTP error status; after that the stream starts and keep-alives cover the wait."""
    first = asyncio.ensure_future(source.__anext__())
    try:
        done, _ = await asyncio.wait({first}, timeout=timeout)
    except BaseException:
        await Primed(first, source).aclose()
        raise
    if (
        done
        and first.exception() is not None
        and not isinstance(first.exception(), StopAsyncIteration)
    ):
        exc = first.exception()
        await Primed(first, source).aclose()
        assert exc is not None
        raise exc
    return Primed(first, source)


async def _disconnected(request: Request) -> None:
    # After the body is read, receive() only returns when the client goes away (or the response ends).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (aborting its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watcher, task):
            if not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
    if task.cancelled():
        raise ClientGone()
    return task.result()


def outputs(
    engine: EngineAPI, requests: list[GenerateRequest]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """merged(), except that max_tokens 0 with nothing to score never reaches the engine."""
    if all(r.params.max_tokens == 0 and not r.params.prompt_logprobs for r in requests):
        return _finished_at_once(requests)
    return merged(engine, requests)


async def _finished_at_once(
    requests: list[GenerateRequest],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    for i, r in enumerate(requests):
        metrics = RequestMetrics(prompt_tokens=len(r.prompt_token_ids))
        yield i, RequestOutput(r.request_id, finish_reason=FinishReason.LENGTH, metrics=metrics)


async def collect(engine: EngineAPI, requests: list[GenerateRequest]) -> list[ChoiceResult]:
    results = [ChoiceResult(index=i) for i in range(len(requests))]
    async for i, out in outputs(engine, requests):
        raise_if_failed(out)
        results[i].add(out)
    return results


# --- usage and timings ------------------------------------------------------------------------


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def timings(metrics: list[RequestMetrics | None]) -> dict[str, Any] | None:
    """The `x_timings` extension: mlxd's measurements of this response (the first choice's rates)."""
    known = [m for m in metrics if m is not None]
    if not known:
        return None
    m = known[0]
    return {
        "prompt_tokens": m.prompt_tokens,
        "cached_tokens": m.cached_tokens,
        "completion_tokens": sum(k.completion_tokens for k in known),
        "prefill_tokens_per_second": round(m.prefill_tps, 2),
        "decode_tokens_per_second": round(m.decode_tps, 2),
        "queue_ms": round(m.queue_time * 1000, 2),
        "load_ms": round(m.load_time * 1000, 2),
        "ttft_ms": round(m.ttft * 1000, 2),
        "total_ms": round(m.total_time * 1000, 2),
    }


def finish_reason(reason: FinishReason | None) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"


def created() -> int:
    return int(time.time())


def engine_of(request: Request) -> EngineAPI:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


FINGERPRINT = "fp_mlxd"


def envelope(obj: str, job_id: str, model: str, include_usage: bool = False) -> dict[str, Any]:
    """The fields a response object, and every chunk of a stream, starts with (a stream's usage
    is null until its final usage chunk)."""
    base: dict[str, Any] = {
        "id": job_id,
        "object": obj,
        "created": created(),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }
    if include_usage:
        base["usage"] = None
    return base


def with_timings(body: dict[str, Any], metrics: list[RequestMetrics | None]) -> dict[str, Any]:
    """Add the `x_timings` extension (a response, or a choice's last chunk)."""
    timing = timings(metrics)
    if timing:
        body["x_timings"] = timing
    return body
