"""KV of earlier prompts, kept (LRU, bounded in bytes) and reused when a new prompt shares a prefix.

Entries are per-layer (keys, values) of one sequence. MLX arrays have value semantics, so an
entry is never changed by the caches built from it. Only plain (non-rotating) caches are kept:
a rotating cache has forgotten its oldest tokens and cannot serve a prefix. Entries are indexed
by a token trie: a lookup walks the query once, whatever the number of entries.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
from mlx_lm.models.cache import KVCache

Key = tuple[int, ...]


class _Node:
    """A trie node: `count` entries pass through it; `end` is the entry ending here."""

    __slots__ = ("children", "count", "end")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0
        self.end: Key | None = None


class PrefixCache:
    def __init__(self, budget_bytes: int, min_tokens: int = 16, token_bytes: int = 0):
        """`token_bytes` > 0 counts an entry as that many bytes per token instead of its arrays'
        size: the ranks of a group, each holding a different share of the KV, then keep and
        evict the same entries (their runners must restore the same prefixes in lockstep)."""
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self.token_bytes = token_bytes
        self._entries: OrderedDict[Key, list[tuple[mx.array, mx.array]]] = OrderedDict()
        self._bytes: dict[Key, int] = {}
        self._root = _Node()
        self.nbytes = 0
        self.hits = 0
        self.queries = 0

    def _walk(self, tokens: list[int] | Key) -> list[_Node]:
        """The trie's nodes along `tokens`, as far as they go (the root excluded)."""
        path, node = [], self._root
        for t in tokens:
            child = node.children.get(t)
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def _match(self, tokens: list[int] | Key) -> tuple[Key | None, int]:
        """An entry sharing the longest prefix with `tokens`, and that prefix's length."""
        path = self._walk(tokens)
        if not path:
            return None, 0
        node = path[-1]
        while node.end is None:  # every node lies on some entry: go down to where one ends
            node = next(iter(node.children.values()))
        return node.end, len(path)

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
        path = self._walk(key)
        if len(path) == n:  # an entry already covers this prefix
            covering, _ = self._match(key)
            assert covering is not None
            self._entries.move_to_end(covering)
            return
        for node in path:  # entries the new one covers go
            if node.end is not None:
                self._drop(node.end)
        # Copies, evaluated: a view, or a copy not yet computed, keeps its source's whole buffer
        # (a step-allocated cache, or a batch's) alive for as long as the entry lives.
        entry = [
            (mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :])) for c in caches
        ]
        mx.async_eval([a for kv in entry for a in kv])
        size = n * self.token_bytes or sum(k.nbytes + v.nbytes for k, v in entry)
        if size > self.budget_bytes:
            return
        while self.nbytes + size > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self._bytes[key] = size
        self.nbytes += size
        node = self._root
        for t in key:
            node = node.children.setdefault(t, _Node())
            node.count += 1
        node.end = key

    def _drop(self, key: Key) -> None:
        del self._entries[key]
        self.nbytes -= self._bytes.pop(key)
        node = self._root
        for t in key:
            child = node.children[t]
            child.count -= 1
            if child.count == 0:
                del node.children[t]  # nothing else passes here: the rest of the path goes too
                return
            node = child
        node.end = None

    def clear(self) -> None:
        self._entries.clear()
        self._bytes.clear()
        self._root = _Node()
        self.nbytes = 0
