"""Each request's stream from the engine thread to its caller's event loop.

The engine thread records who owns a request (its model's core and the registry reference it
holds) and where its outputs go. Outputs wait in an outbox until `flush()`, which hands each
event loop everything of the step in one `call_soon_threadsafe`: one wake-up of the loop (one
write to its self-pipe) per step, not one per request and output. No MLX here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.core import EngineCore
from engine.outputs import StepOutput
from engine.sequence import Sequence

log = logging.getLogger("mlxd.engine")

Release = Callable[[str, float | None], None]  # the registry's release(model, keep_alive)


@dataclass(frozen=True)
class Sink:
    """Where a request's outputs go: a queue read on its caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepOutput]

    @classmethod
    def here(cls) -> Sink:
        """A sink read on the running event loop."""
        return cls(asyncio.get_running_loop(), asyncio.Queue())


def _deliver(batch: list[tuple[asyncio.Queue[StepOutput], StepOutput]]) -> None:
    """On the event loop: a step's outputs into their requests' queues, in order."""
    for queue, out in batch:
        queue.put_nowait(out)


class Streams:
    """The engine thread's side of every open request: its owner and its sink."""

    def __init__(self, release: Release):
        self._release = release  # hands back the model reference a request held
        self._owner: dict[str, tuple[str, EngineCore]] = {}  # request id -> (model, its core)
        self._sinks: dict[str, Sink] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Any, StepOutput]]] = {}

    def __bool__(self) -> bool:
        """Some request is still open."""
        return bool(self._owner)

    def open(self, request_id: str, sink: Sink) -> None:
        """Its outputs go to `sink` from now on (before the request is queued)."""
        self._sinks[request_id] = sink

    def own(self, request_id: str, model: str, core: EngineCore) -> None:
        """The request is queued on `core`, holding a reference to `model`."""
        self._owner[request_id] = (model, core)

    def close(self, request_id: str) -> None:
        """Forget a request that could not be queued (its caller releases the model)."""
        self._sinks.pop(request_id, None)

    def emit(self, seq: Sequence, out: StepOutput) -> None:
        """A step's output for one request (engine thread); sent by the next `flush`. Its
        last output ends the stream and hands back the request's model reference."""
        sink = self._sinks.get(seq.id)
        if out.finish_reason is not None:
            self._sinks.pop(seq.id, None)
            owner = self._owner.pop(seq.id, None)
            if owner is not None:
                self._release(owner[0], seq.request.keep_alive)
        if sink is not None:
            self._outbox.setdefault(sink.loop, []).append((sink.queue, out))

    def flush(self) -> None:
        """Send what the outbox holds: one call per event loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, batch in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: its consumers are gone
                log.warning("could not deliver %d outputs: their event loop is closed", len(batch))

    def abort(self, request_id: str) -> None:
        """The caller left: abort the request on its core (engine thread) and release it."""
        owner = self._owner.pop(request_id, None)
        if owner is not None:
            owner[1].abort(request_id)
            self._sinks.pop(request_id, None)
            self._release(owner[0], None)

    def end_all(self, out: StepOutput) -> None:
        """End every open stream with `out` now, from any thread (the engine thread may be
        stuck): each sink is sent it directly, not through the outbox."""
        for rid in list(self._sinks):
            sink = self._sinks.pop(rid, None)
            if sink is None:
                continue
            try:
                sink.loop.call_soon_threadsafe(sink.queue.put_nowait, out)
            except RuntimeError:  # that stream's loop is gone already
                log.debug("could not end request %s", rid)
