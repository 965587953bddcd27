"""Graceful shutdown: SIGTERM / SIGINT drain the engine while uvicorn stops accepting, then exit 0.

Plain uvicorn waits for open connections *before* the lifespan shutdown runs, so the engine would
learn of the signal only after every stream had ended (or been cut without a final frame), and it
re-raises the signal at the end, so the process dies of SIGTERM instead of exiting 0. Here the
first signal also starts `engine.shutdown(drain_timeout)` at once: new requests get 503
(EngineShuttingDownError), running ones finish within the drain timeout, the rest end with
FinishReason.ABORT (a proper final frame), models unload; then uvicorn closes the connections,
runs the lifespan shutdown (a second, idempotent engine.shutdown) and returns normally.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("mlxd.server")

# Time for aborted streams to send their last frame after the engine's drain timeout expires.
FINAL_FRAME_GRACE = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains `engine` on the first SIGTERM/SIGINT (a second SIGINT forces)."""

    def __init__(self, config: uvicorn.Config, engine: Any, drain_timeout: float = 10.0):
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = int(drain_timeout + FINAL_FRAME_GRACE)
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)
        if self.drain_task is not None and not self.drain_task.done():
            await self.drain_task

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after serving; we exit with code 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
        if first and self._loop is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            log.info("%s received: draining for up to %.0f s", name, self.drain_timeout)
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self.drain_task is None:
            self.drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.engine.shutdown(self.drain_timeout)
        except Exception as e:  # the lifespan shutdown tries again; never crash the exit path
            log.warning("engine shutdown failed: %s", type(e).__name__)
