"""The thread model loads run on: one for the process, in the background.

A load beside streams of another model shares the CPU with their steps. On this thread it gets a
core only where no other thread wants one (Linux's idle scheduling class), and so does the MLX
stream that reads and converts its weights, which also never takes the kernels' worker threads
(models/qkernels.background_stream). In-process, SmolLM2 decoding one row beside repeated loads of
a second copy (2 cores, 1 ms GIL switch interval), mean step times while a load's Python ran /
while its weights were evaluated: 14.0-14.9 / 13.1-14.2 ms on an ordinary thread, 10.4-10.6 /
8.4-9.6 ms here, against 8.6-9.0 ms between loads. A load takes longer on a busy machine (there
0.1-0.2 s became 0.1-0.7 s; beside 16 streams of a server, 0.2-0.3 s became 0.7-1.1 s) and no
longer on an idle one.

Only while other models generate: on an idle engine a load runs on an ordinary thread, so a
machine busy with other programs (where the idle class gets next to no CPU) loads as before.

Two threads, kept: MLX gives each thread its own default stream, so each new thread would add one.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import mlx.core as mx

from models import qkernels
from models.memory import backend

log = logging.getLogger("mlxd.loader")
T = TypeVar("T")

_lock = threading.Lock()
_threads: dict[bool, queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]] = {}


def run_load(fn: Callable[[], T], background: bool) -> T:
    """fn() on a load thread, in the background or not; returns its result or raises its
    exception."""
    with _lock:
        jobs = _threads.get(background)
        if jobs is None:
            jobs = _threads[background] = queue.SimpleQueue()
            # A daemon that waits for ever: a thread that used MLX and ends while the interpreter
            # finalizes aborts the process (MLX's thread-local destructor takes the GIL), and the
            # threads of a ThreadPoolExecutor end just then.
            name = "mlxd-load-bg" if background else "mlxd-load"
            threading.Thread(target=_serve, args=(jobs, background), name=name, daemon=True).start()
    done: Future[T] = Future()
    jobs.put((fn, done))
    return done.result()


def _serve(
    jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]], background: bool
) -> None:
    if background:
        try:
            _to_background()
        except Exception:  # never a thread that takes loads and runs none: they run as before
            log.warning("the background load thread keeps its priority", exc_info=True)
    while True:
        fn, done = jobs.get()
        try:
            done.set_result(fn())
        except BaseException as e:  # the caller's to handle, never this thread's end
            done.set_exception(e)
        del fn, done  # the next load may be long in coming: keep nothing of this one alive


def _to_background() -> None:
    """Put the calling (new) thread and its MLX stream in the background where the OS allows.
    The stream first: its thread and the kernels' workers, which that call may start, would
    inherit this thread's class if it were idle already."""
    if backend() == "cpu":
        qkernels.background_stream(mx.default_stream(mx.cpu))
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None:
        try:
            os.sched_setscheduler(0, idle, os.sched_param(0))
        except OSError as e:  # a sandbox may forbid it: loads then run as before
            log.debug("the load thread keeps its priority: %s", e)
