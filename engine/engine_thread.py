"""The one thread that owns MLX: runs posted calls (loads, submits, aborts) and steps every model."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("mlxd.engine")
T = TypeVar("T")

IDLE_TICK = 1.0  # seconds between idle housekeeping rounds (keep_alive expiry)


class EngineThread:
    def __init__(
        self,
        step_all: Callable[[], bool],
        housekeeping: Callable[[], None],
        on_exit: Callable[[], None] = lambda: None,
        flush: Callable[[], None] = lambda: None,
    ):
        self._step_all = step_all  # steps every model with work; False when none had any
        self._housekeeping = housekeeping
        self._on_exit = on_exit
        self._flush = flush  # sends what posted calls and steps emitted (once per round)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failed: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlxd-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout)

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread, between steps."""
        self._inbox.put(fn)

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on the engine thread; the returned future resolves on the caller's loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if fut.done():
                return
            fut.set_result(value) if ok else fut.set_exception(value)

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:  # handed to the caller, never lost on this thread
                loop.call_soon_threadsafe(settle, False, e)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        self.post(run)
        return fut

    def _drain(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=IDLE_TICK) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                fn()
            except Exception:  # a posted call failed: log it, keep serving everyone else
                log.exception("engine call failed")
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _guarded(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a part of the loop; an Exception is logged, never the end of the thread."""
        try:
            return fn()
        except Exception:
            log.exception(what)
            return False

    def _run(self) -> None:
        last_housekeeping = time.monotonic()
        try:
            busy = False
            while not self._stop.is_set():
                self._drain(block=not busy)
                busy = self._guarded(self._step_all, "engine step failed")
                if time.monotonic() - last_housekeeping >= IDLE_TICK:
                    self._guarded(self._housekeeping, "engine housekeeping failed")
                    last_housekeeping = time.monotonic()
                self._guarded(self._flush, "engine output delivery failed")
        except BaseException as e:  # the engine is dead: /health says so
            self.failed = e
            log.exception("engine thread failed")
        finally:
            self._on_exit()
