"""Async plumbing the job runner needs: run several engine streams at once, wait for a stream's
first item with a timeout, and cancel work whose client went away. No API knowledge here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from engine.api import EngineAPI
from engine.types import GenerateRequest, RequestOutput

T = TypeVar("T")


async def merged(
    engine: EngineAPI, requests: list[GenerateRequest]
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Run the requests concurrently; yield (request index, output) as outputs arrive.

    Leaving early (break, aclose, cancellation) cancels every pump, which closes each engine
    iterator and so aborts its request. One request (the usual case) is iterated directly: no
    pump task and queue between its outputs and the caller.
    """
    if len(requests) == 1:
        gen = engine.generate(requests[0])
        async with contextlib.aclosing(gen):  # type: ignore[type-var]
            async for out in gen:
                yield 0, out
        return
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


async def prime(source: AsyncIterator[Any], timeout: float | None) -> Primed:
    """Wait up to `timeout` for the first item, so a rejection (queue full, context, ...) is
    still an HTTP error status; after that the stream starts and keep-alives cover the wait."""
    first = asyncio.ensure_future(source.__anext__())
    try:
        done, _ = await asyncio.wait({first}, timeout=timeout)
    except BaseException:
        await Primed(first, source).aclose()
        raise
    if done and not first.cancelled():
        exc = first.exception()
        if exc is not None and not isinstance(exc, StopAsyncIteration):
            await Primed(first, source).aclose()
            raise exc
    return Primed(first, source)


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _disconnected(request: Request) -> None:
    # After the body is read, receive() only returns when the client goes away (or the response ends).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (aborting its engine requests)
    and raise ClientGone."""
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
