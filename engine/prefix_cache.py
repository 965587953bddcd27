"""KV of earlier prompts, kept (LRU, bounded in bytes) and reused when a new prompt shares a prefix.

Entries are per-layer (keys, values) of one sequence. MLX arrays have value semantics, so an
entry is never changed by the caches built from it. Only plain (non-rotating) caches are kept:
a rotating cache has forgotten its oldest tokens and cannot serve a prefix.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 16):
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[int, ...], list[tuple[mx.array, mx.array]]] = OrderedDict()
        self._bytes: dict[tuple[int, ...], int] = {}
        self.nbytes = 0
        self.hits = 0
        self.queries = 0

    def _match(self, tokens: list[int]) -> tuple[tuple[int, ...] | None, int]:
        best, best_len = None, 0
        for key in self._entries:
            n = min(len(key), len(tokens))
            i = 0
            while i < n and key[i] == tokens[i]:
                i += 1
            if i > best_len:
                best, best_len = key, i
        return best, best_len

    def lookup(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` have KV here (0 when under min_tokens)."""
        self.queries += 1
        _, n = self._match(tokens)
        if n < self.min_tokens:
            return 0
        self.hits += 1
        return n

    def restore(self, tokens: list[int], n: int) -> list[KVCache] | None:
        """Fresh per-layer caches holding the KV of tokens[:n]."""
        key, m = self._match(tokens)
        if key is None or m < n:
            return None
        self._entries.move_to_end(key)
        caches = []
        for k, v in self._entries[key]:
            c = KVCache()
            c.keys, c.values = k[..., :n, :], v[..., :n, :]
            c.offset = n
            caches.append(c)
        return caches

    def insert(self, tokens: list[int], caches: list) -> None:
        """Keep the KV of `tokens` (caches hold at least that many positions)."""
        n = len(tokens)
        if self.budget_bytes <= 0 or n < self.min_tokens:
            return
        if not all(type(c) is KVCache and c.offset >= n for c in caches):
            return
        key = tuple(tokens)
        for other in list(self._entries):
            if len(other) >= n and other[:n] == key:
                self._entries.move_to_end(other)
                return  # an entry already covers this prefix
            if len(other) < n and key[: len(other)] == other:
                self._drop(other)  # the new entry covers the old one
        # Copies, evaluated: a view, or a copy not yet computed, keeps its source's whole buffer
        # (a step-allocated cache, or a batch's) alive for as long as the entry lives.
        entry = [
            (mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :])) for c in caches
        ]
        mx.async_eval([a for kv in entry for a in kv])
        size = sum(k.nbytes + v.nbytes for k, v in entry)
        if size > self.budget_bytes:
            return
        while self.nbytes + size > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self._bytes[key] = size
        self.nbytes += size

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self.nbytes -= self._bytes.pop(key)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes.clear()
        self.nbytes = 0
