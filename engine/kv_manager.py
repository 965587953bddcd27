"""KV memory accounting in tokens and bytes (no MLX): admit, free, report.

A sequence reserves KV for what it holds plus a chunk, and more as it grows (the scheduler
decides; when the budget runs out it preempts the youngest running sequences). One KVManager is
shared by every loaded model: they draw from one memory budget.
"""

from __future__ import annotations

import threading


class KVManager:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._used = 0
        self._by_seq: dict[str, int] = {}
        self._lock = threading.Lock()  # read by the registry and /metrics from other threads

    @property
    def used_bytes(self) -> int:
        return self._used

    def reserve(self, seq_id: str, nbytes: int) -> bool:
        """Reserve `nbytes` for a sequence; False (and nothing reserved) if over budget."""
        with self._lock:
            if self._used + nbytes > self.budget_bytes:
                return False
            self._by_seq[seq_id] = self._by_seq.get(seq_id, 0) + nbytes
            self._used += nbytes
            return True

    def release(self, seq_id: str, nbytes: int) -> None:
        """Give back part of a sequence's reservation."""
        with self._lock:
            nbytes = min(nbytes, self._by_seq.get(seq_id, 0))
            self._by_seq[seq_id] = self._by_seq.get(seq_id, 0) - nbytes
            self._used -= nbytes

    def free(self, seq_id: str) -> None:
        with self._lock:
            self._used -= self._by_seq.pop(seq_id, 0)

    def __len__(self) -> int:
        return len(self._by_seq)
