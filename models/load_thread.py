"""The thread model loads run on: one for the process, in the background.

A load beside streams of another model shares the CPU with their steps. On this thread it gets a
core only where no other thread wants one (Linux's idle scheduling class), and so does the MLX
stream that reads and converts its weights, which also never takes the kernels' worker threads
(models/qkernels.background_stream). In-process, SmolLM2 decoding one row beside repeated loads of
a second copy (2 cores, 1 ms GIL switch interval): steps took 13.2-14.0 ms on average while a
load's Python ran and 14.8-15.9 ms while its weights were evaluated, against 8.6-9.4 ms between
loads; on this thread, 10.0-11.6 and 8.1-9.0 ms. A load takes longer on a busy machine
(0.1-0.3 s became 0.1-1.1 s there) and no longer than before on an idle one.

One thread, kept: MLX gives each thread its own default stream, so each new thread would add one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import mlx.core as mx

from models import qkernels
from models.memory import backend

log = logging.getLogger("mlxd.loader")
T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def run_load(fn: Callable[[], T]) -> T:
    """fn() on the load thread; returns its result or raises its exception."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="mlxd-load", initializer=_to_background
            )
    return _executor.submit(fn).result()


def _to_background() -> None:
    """Put the calling (new) thread and its MLX stream in the background where the OS allows.
    The stream first: threads started from this one after it is idle inherit its class."""
    if backend() == "cpu":
        qkernels.background_stream(mx.default_stream(mx.cpu))
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None:
        try:
            os.sched_setscheduler(0, idle, os.sched_param(0))
        except OSError as e:  # a sandbox may forbid it: loads then run as before
            log.debug("the load thread keeps its priority: %s", e)
