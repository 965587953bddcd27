"""The only place that frames streams: Server-Sent Events (OpenAI) and NDJSON (Ollama).

Typed SSE streams (Anthropic Messages, OpenAI Responses) name each event: `event: <type>` then
`data: <json>`, no `[DONE]`; their keep-alive is the API's own (Anthropic: a `ping` event).

Routes produce async iterators of JSON-able dicts; these helpers turn them into bytes, insert
keep-alive comments (SSE) while the producer is silent, turn a mid-stream exception into one error
frame, and end SSE streams with `data: [DONE]`. Every frame is valid UTF-8.

Cancellation: the producer is consumed through a pending task so a keep-alive tick never cancels
it; when the consumer goes away (client disconnect), the producer is closed, which aborts the
engine request behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi.responses import StreamingResponse

KEEPALIVE_SECONDS = 10.0
SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

ErrorBody = Callable[[BaseException], dict[str, Any]]


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8; a lone surrogate becomes U+FFFD instead of an invalid byte."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "replace") if _has_surrogate(text) else text.encode("utf-8")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def sse_typed_event(obj: dict[str, Any]) -> bytes:
    """`event: <obj["type"]>` and its `data:` line."""
    return b"event: " + str(obj["type"]).encode("utf-8") + b"\n" + sse_event(obj)


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return dumps(obj) + b"\n"


async def with_keepalive(
    source: AsyncIterator[Any], interval: float | None
) -> AsyncIterator[Any | None]:
    """Yield source's items, and None whenever `interval` seconds pass without one.

    The pending __anext__ survives the timeout (it is a task, never cancelled by a tick); leaving
    this generator cancels it and closes `source`.
    """
    pending: asyncio.Task[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


async def sse_stream(
    events: AsyncIterator[dict[str, Any]],
    error_body: ErrorBody,
    keepalive: float | None = KEEPALIVE_SECONDS,
) -> AsyncIterator[bytes]:
    """Frame `events` as SSE: `data: <json>`, `: keep-alive` comments, an error frame, `[DONE]`."""
    try:
        async for item in with_keepalive(events, keepalive):
            yield SSE_KEEPALIVE if item is None else sse_event(item)
    except Exception as exc:  # headers are sent: the error must travel in-band
        yield sse_event(error_body(exc))
    yield SSE_DONE


async def sse_typed_stream(
    events: AsyncIterator[dict[str, Any]],
    error_event: ErrorBody,
    keepalive: float | None = KEEPALIVE_SECONDS,
    keepalive_event: dict[str, Any] | None = None,
    numbered: bool = False,
) -> AsyncIterator[bytes]:
    """Frame typed events (each has "type"); an exception becomes one last error event.

    While the producer is silent, `keepalive_event` is sent (or a `: keep-alive` comment); before
    the first event it is always the comment, so the stream's first event is the API's own.
    `numbered`: each event, the error event included, gets the next `sequence_number`."""
    ping = SSE_KEEPALIVE if keepalive_event is None else sse_typed_event(keepalive_event)
    count = itertools.count()
    started = False

    def frame(event: dict[str, Any]) -> bytes:
        nonlocal started
        started = True
        return sse_typed_event({**event, "sequence_number": next(count)} if numbered else event)

    try:
        async for item in with_keepalive(events, keepalive):
            yield (ping if started else SSE_KEEPALIVE) if item is None else frame(item)
    except Exception as exc:  # headers are sent: the error must travel in-band
        yield frame(error_event(exc))


async def ndjson_stream(
    events: AsyncIterator[dict[str, Any]],
    error_body: ErrorBody,
    keepalive: float | None = None,
    heartbeat: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """Frame `events` as NDJSON lines; an exception becomes one last `{"error": ...}` line.

    With `keepalive` and a `heartbeat` object, that object is sent after that many silent
    seconds. It must be a harmless line of the stream (an empty fragment): Ollama's clients
    json-parse every line, a blank one included, so NDJSON has no comment to send instead.
    """
    interval = keepalive if heartbeat is not None else None
    try:
        async for item in with_keepalive(events, interval):
            yield ndjson_line(heartbeat if item is None else item)  # type: ignore[arg-type]
    except Exception as exc:
        yield ndjson_line(error_body(exc))


Framing = Literal["sse", "typed-sse", "numbered-sse", "ndjson"]


def framed_response(
    kind: Framing,
    events: AsyncIterator[dict[str, Any]],
    error_body: ErrorBody,
    keepalive: float | None,
    heartbeat: dict[str, Any] | None = None,
) -> StreamingResponse:
    """`events` as a streamed response: "sse" (`data:` frames and [DONE]: OpenAI chat),
    "typed-sse" (`event:` and `data:` lines: Anthropic), "numbered-sse" (typed, with a
    `sequence_number`: OpenAI Responses) or "ndjson" (Ollama)."""
    if kind == "sse":
        return sse_response(sse_stream(events, error_body, keepalive))
    if kind != "ndjson":
        numbered = kind == "numbered-sse"
        return sse_response(sse_typed_stream(events, error_body, keepalive, heartbeat, numbered))
    return ndjson_response(ndjson_stream(events, error_body, keepalive, heartbeat))


def sse_response(
    body: AsyncIterator[bytes], headers: dict[str, str] | None = None
) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={**STREAM_HEADERS, **(headers or {})}
    )


def ndjson_response(
    body: AsyncIterator[bytes], headers: dict[str, str] | None = None
) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="application/x-ndjson", headers={**STREAM_HEADERS, **(headers or {})}
    )
