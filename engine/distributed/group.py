"""The process group one model is served across, its messages, and the watchdog that bounds them.

A message (a step's plan, a heartbeat) goes from rank 0 to every rank as JSON packed into an int32
array summed over the group (`mx.distributed.all_sum`, the other ranks adding zeros): MLX's own
transport (ring, MPI, JACCL), nothing of ours on the wire.

MLX's group must be initialized on the thread that runs its collectives (measured with MLX 0.32:
a group made on the main thread and used from another one deadlocks in the first all_sum), so
`init_group` is called on the thread that then owns every MLX call of this rank.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

log = logging.getLogger("mlxd.dist")

MODES = ("tensor", "pipeline")
JOIN_TIMEOUT = 300.0  # seconds a rank keeps trying to reach the others at start
# Where each launcher puts a process's rank: mlx.launch (ring, JACCL, NCCL), then MPI's.
_RANK_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class GroupError(RuntimeError):
    """The group cannot start, or a rank failed or stopped answering."""


def prepare(mode: str) -> int:
    """This process's rank, once the split is one this build can make (GroupError says why not)."""
    from models.sharding import ShardingError, check_mode

    try:
        check_mode(mode)
    except ShardingError as e:
        raise GroupError(str(e)) from None
    rank = launched_rank()
    share_cores(rank)
    return rank


def share_cores(rank: int) -> None:
    """Ranks on one host split its cores between their BLAS threads (unless the user chose):
    OpenMP threads of several processes spin-waiting on the same cores starve each other
    (measured on 2 cores: 3 ranks' MKL barriers made a step many times slower). Runs before
    the first BLAS call, which reads these variables."""
    if any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return
    hosts = _ring_hosts()
    if not hosts or rank >= len(hosts):
        return
    local = sum(1 for h in hosts if h[:1] == hosts[rank][:1])
    threads = str(max(1, (os.cpu_count() or 1) // local))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads


def _ring_hosts() -> list[list[str]]:
    """Each rank's IPs from the ring backend's hostfile ([["ip:port", ...], ...]), or []."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return []
    try:
        with open(path) as f:
            data = json.load(f)
        return [[str(a).rsplit(":", 1)[0] for a in h] for h in data if isinstance(h, list)]
    except (OSError, ValueError):
        return []


def launched_rank() -> int:
    """This process's rank as its launcher set it, read before the group exists (the rank decides
    which thread may initialize it); GroupError when no launcher started this process."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    raise GroupError(
        "--distributed needs the processes started by mlx.launch, e.g. `mlx.launch --backend "
        "ring -n 3 -- mlxd serve --distributed tensor` (a hostfile for several hosts; see README)"
    )


@dataclass
class Group:
    mode: str  # one of MODES
    group: Any  # mx.distributed.Group

    @property
    def rank(self) -> int:
        return int(self.group.rank())

    @property
    def size(self) -> int:
        return int(self.group.size())

    def broadcast(self, message: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's `message` on every rank (the others pass None). Two all_sums: size, body."""
        body = json.dumps(message, separators=(",", ":")).encode() if self.rank == 0 else b""
        n = int(self._sum(np.array([len(body)], dtype=np.int32))[0])
        words = np.zeros((n + 3) // 4, dtype=np.int32)
        if self.rank == 0:
            words = np.frombuffer(body.ljust(words.size * 4, b"\0"), dtype=np.int32)
        raw = self._sum(words).astype(np.int32).tobytes()[:n]
        return dict(json.loads(raw))

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (non-negative ints below 2**31), in rank order, on every rank."""
        table = np.zeros((self.size, len(values)), dtype=np.int32)
        table[self.rank] = values
        return [[int(v) for v in row] for row in self._sum(table)]

    def _sum(self, a: np.ndarray) -> np.ndarray:
        return np.array(mx.distributed.all_sum(mx.array(a), group=self.group, stream=mx.cpu))


def init_group(mode: str) -> Group:
    """This process's group as its launcher set it up. Call it on the thread that will run every
    MLX call of this rank."""
    if mode not in MODES:
        raise GroupError(f"--distributed must be one of {', '.join(MODES)}, not {mode!r}")
    deadline = time.monotonic() + JOIN_TIMEOUT
    while True:
        try:
            g = mx.distributed.init(strict=True)
            break
        except RuntimeError as e:
            # The ring backend gives up on a peer after ~30 s; rank 0 joins only once its HTTP
            # server has started and the model is imported, which can take longer (measured:
            # 34 s on the shared 2-core machine). A retry joins the same group.
            if "connect" not in str(e).lower() or time.monotonic() > deadline:
                raise GroupError(f"no distributed backend could start ({e}); see README") from None
            log.info("no peer answered yet (%s); trying again", e)
    if g.size() < 2:
        raise GroupError("--distributed needs at least 2 ranks (mlx.launch -n N with N >= 2)")
    return Group(mode, g)


class Watchdog:
    """Calls `on_trip(message)` once when a guarded call runs past its deadline.

    A call blocked inside MLX cannot be interrupted, so `on_trip` runs on the watchdog's own
    thread and must end the process after doing what it can."""

    def __init__(self, on_trip: Callable[[str], None], tick: float = 0.25):
        self._on_trip = on_trip
        self._deadline: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        self.tripped = False
        threading.Thread(
            target=self._watch, args=(tick,), name="mlxd-watchdog", daemon=True
        ).start()

    @contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        with self._lock:
            outer = self._deadline, self._what
            self._deadline, self._what = time.monotonic() + timeout, what
        try:
            yield
        finally:
            with self._lock:
                self._deadline, self._what = outer

    def _watch(self, tick: float) -> None:
        while not self.tripped:
            time.sleep(tick)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                self.tripped = True
                self._on_trip(f"a rank stopped answering during {what}")


def exit_soon(code: int, delay: float = 1.0) -> None:
    """End the process with `code` after `delay` seconds (time for error frames to reach their
    clients), whatever thread is stuck: a rank of a failed group cannot shut down cleanly."""

    def _exit() -> None:
        time.sleep(delay)
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=_exit, name="mlxd-exit", daemon=True).start()
