"""The process's memory while serving: MLX's buffer cache bounded by what a step needs, and
everything freed given back to the OS when the engine goes idle.

MLX keeps freed buffers for reuse up to its cache limit, but reuses one only for a request of
nearly its size. Under continuous batching the KV arrays grow and rows come and go, so most
freed sizes never recur and the cache fills to its limit with buffers nobody takes: a 7-minute
soak held 2.37 GB of them (the limit was the memory limit / 8) for 538 MB of weights. Bounded
by the transient arrays of one step of each loaded model (the buffers that do recur, layer
after layer), the cache keeps its use: a prompt chunk's while prompts are prefilling, a decode
step's (a quarter of it for SmolLM2 at 32 rows) otherwise. After `idle_release` seconds
without work it is dropped, and so are the free pages of the C heap (glibc keeps freed memory
mapped until it is trimmed).

Calls MLX: used on the engine thread only (stats() reads counters from any thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import psutil

log = logging.getLogger("mlxd.engine")

MIN_CACHE_LIMIT = 16 << 20  # the smallest cache limit a computed one gets
MIN_TRANSIENT_CACHE = 4 << 20  # ... and the smallest while little is held (a prefill piece's)
# The target: the process's memory within what the models keep (weights, KV, prefix caches) and
# this share of it more (issue 12; `make soak` checks it against the memory held at startup).
MEMORY_MARGIN = 0.2
# What a step may hold beyond what the models keep, as a share of that: its arrays, and as much
# again in MLX's cache of their freed buffers. The rest of the margin is the process's own
# (tokenizers, Python objects, the C heap); where that takes more, steps get what it leaves.
TRANSIENT_SHARE = 0.07
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 << 10


def _libc_function(name: str) -> Any:
    """A glibc function (None elsewhere: macOS's and musl's allocators need no such help)."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name, None) if lib else None
    except OSError:
        return None


def _heap_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0) (returns the C heap's free pages to the OS); elsewhere a no-op."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0) and None


def map_large_allocations() -> None:
    """Have glibc map buffers of MMAP_THRESHOLD bytes and more on their own, so freeing one
    returns it to the OS at once. By default the threshold rises to 32 MB as such buffers are
    freed, after which KV arrays and activations come from the heap and a freed one stays
    resident (its neighbours pin it) until a trim. 128 KB, not 1 MB: a prefilling sequence's
    own caches are ~200 KB a layer (SmolLM2, 256 tokens), freed when it joins the batch; from
    the heap they left up to ~170 MB resident outside MLX in the soak's admission bursts."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@dataclass
class MemoryReport:
    """The process's memory as /metrics shows it (named as EngineStats's fields)."""

    rss_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int
    mlx_cache_bytes: int
    mlx_cache_limit_bytes: int
    memory_releases: int  # times the idle engine gave the cache and the heap's free pages back


class MemoryGovernor:
    def __init__(self, cache_limit: int, idle_release: float, ceiling: int):
        """`cache_limit` > 0 fixes MLX's cache limit; 0 computes it from the loaded models'
        steps (never above `ceiling`). `idle_release` < 0: never release when idle."""
        self.fixed = cache_limit
        self.idle_release = idle_release
        self.ceiling = max(ceiling, MIN_CACHE_LIMIT)
        self.cache_limit = 0
        self._limits = (0, 0)  # (decoding, prefilling)
        self._prefilling = True
        self.releases = 0
        self._busy_at = time.monotonic()
        self._released = True
        self._trim = _heap_trim()
        self._process = psutil.Process()
        self._start_rss = 0  # before any model (start()); 0: not measured
        self.own_bytes = 0  # the process's own memory beyond that, as of the last steps

    def start(self) -> None:
        """Before the first model: the smallest cache; large buffers mapped on their own; the
        process's memory noted (what its own is counted from)."""
        map_large_allocations()
        self._start_rss = self._process.memory_info().rss
        self.set_step_bytes(0)

    def set_step_bytes(self, step_bytes: int, decode_bytes: int = 0) -> None:
        """The loaded models' steps allocate and free up to `step_bytes` (a full prompt chunk),
        their decode steps `decode_bytes` (0: as much): bound the cache by it."""

        def limit(n: int) -> int:
            return self.fixed or min(max(n, MIN_CACHE_LIMIT), self.ceiling)

        self._limits = (limit(decode_bytes or step_bytes), limit(step_bytes))
        self._set_limit(self._limits[self._prefilling])

    def _set_limit(self, limit: int) -> None:
        if limit != self.cache_limit:  # lowering it frees cached buffers over it at once
            mx.set_cache_limit(limit)
            log.debug("MLX buffer cache limit %.0f MB", limit / 1e6)
            self.cache_limit = limit

    def transient_budget(self, held: int) -> int:
        """Bytes a step's arrays may take while the models hold `held` bytes: right after a
        load, when little is held yet, a burst of new prompts prefills in batches (and pieces)
        this small, and the cache keeps no more of their buffers. TRANSIENT_SHARE of `held`, or
        half of what the process's own memory leaves of the margin: a small model's tokenizer
        alone (SmolLM2's, 13-15 MB resident) takes most of the 20 MB a 98 MB model allows."""
        room = int(MEMORY_MARGIN * held) - self.own_bytes
        return max(0, min(int(TRANSIENT_SHARE * held), room // 2))

    def _measure_own(self) -> None:
        """The process's memory beyond its start, MLX's arrays and MLX's cache (~30 us)."""
        if self._start_rss:
            rss = self._process.memory_info().rss
            mlx = mx.get_active_memory() + mx.get_cache_memory()
            self.own_bytes = max(0, rss - self._start_rss - mlx)

    def prefilling(self, prefilling: bool, held: int = 0) -> None:
        """Before steps: whether they prefill prompts (the cache holds a chunk's buffers), and
        what the models hold now (> 0: the cache holds no more than `transient_budget` of it)."""
        self._prefilling = prefilling
        limit = self._limits[prefilling]
        if held > 0 and not self.fixed:
            self._measure_own()
            limit = min(limit, max(MIN_TRANSIENT_CACHE, self.transient_budget(held)))
        self._set_limit(limit)

    def busy(self) -> None:
        """A step ran."""
        self._busy_at = time.monotonic()
        self._released = False

    def tick(self) -> bool:
        """Between steps: release once the engine has been idle `idle_release` seconds."""
        if self._released or self.idle_release < 0:
            return False
        if time.monotonic() - self._busy_at < self.idle_release:
            return False
        self.release()
        return True

    def trim_heap(self) -> None:
        """Give the C heap's free pages back to the OS now. After a model load: parsing
        SmolLM2's tokenizer.json (Rust, small allocations) and the buffers MLX's cache drops
        as its limit falls leave ~8-14 MB free but resident (28.8 MB RSS during the parse,
        14.5 MB held after), which glibc returns by itself only from the top of the heap."""
        self._trim()

    def release(self) -> None:
        mx.clear_cache()
        self._trim()
        self.releases += 1
        self._released = True

    def report(self) -> MemoryReport:
        return MemoryReport(
            rss_bytes=self._process.memory_info().rss,
            mlx_active_bytes=mx.get_active_memory(),
            mlx_peak_bytes=mx.get_peak_memory(),
            mlx_cache_bytes=mx.get_cache_memory(),
            mlx_cache_limit_bytes=self.cache_limit,
            memory_releases=self.releases,
        )


def settle_mlx() -> None:
    """Wait for queued MLX work before the engine thread ends: work still running when the
    interpreter exits tears down MLX's worker threads mid-task (std::terminate)."""
    mx.synchronize()
