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

    A keep-alive tick never cancels the source's pending `__anext__`: one reader task pulls the
    source for the whole stream (not a task per item) and hands each item over through a
    one-slot `_Handoff`, whose wait a timer ends. Leaving this generator cancels the reader
    and closes `source`."""
    reader: asyncio.Task[None] | None = None
    try:
        if interval is None:  # no ticks: nothing to outwait, the items as they come
            async for item in source:
                yield item
            return
        handoff = _Handoff()
        reader = asyncio.ensure_future(handoff.fill(source))
        while True:
            got = await handoff.take(interval)
            if got is _SILENT:
                yield None
            elif got is _END:
                return
            elif isinstance(got, _Raised):
                raise got.exc
            else:
                yield got
    finally:
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()


_EMPTY, _SILENT, _END = object(), object(), object()


class _Raised:
    """The source raised: re-raised where its items are consumed."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Handoff:
    """One item at a time from the reader task to the consumer, who waits at most a timeout."""

    def __init__(self) -> None:
        self._item: Any = _EMPTY
        self._arrived: asyncio.Future[None] | None = None  # the consumer waits for an item
        self._taken: asyncio.Future[None] | None = None  # the reader waits for the slot

    async def fill(self, source: AsyncIterator[Any]) -> None:
        """The reader: every item of `source`, then _END (or what it raised)."""
        try:
            while True:
                await self._put(await source.__anext__())
        except StopAsyncIteration:
            await self._put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the consumer raises it, as it would have from source
            await self._put(_Raised(exc))

    async def _put(self, item: Any) -> None:
        while self._item is not _EMPTY:  # the last one is still being consumed
            self._taken = asyncio.get_running_loop().create_future()
            await self._taken
        self._item = item
        if self._arrived is not None:
            _wake(self._arrived)

    async def take(self, timeout: float) -> Any:
        """The next item, or _SILENT if none came within `timeout` seconds."""
        if self._item is _EMPTY:
            loop = asyncio.get_running_loop()
            self._arrived = arrived = loop.create_future()
            timer = loop.call_later(timeout, _wake, arrived)
            try:
                await arrived
            finally:
                timer.cancel()
                self._arrived = None
            if self._item is _EMPTY:
                return _SILENT
        item, self._item = self._item, _EMPTY
        if self._taken is not None:
            _wake(self._taken)
        return item


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
