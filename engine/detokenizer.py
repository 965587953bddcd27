"""Incremental detokenizing and stop strings, run on the async side (off the step thread).

Text is released only when it is whole: a token that ends inside a UTF-8 sequence decodes to
U+FFFD and is held until the next token completes it. Text that could be the start of a stop
string is held until it is known not to be; a stop string is never emitted.
"""

from __future__ import annotations

from collections.abc import Callable

_CONTEXT = 4  # prompt tokens decoded ahead of the output so leading spaces come out right


class Detokenizer:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_ids: list[int] | None = None,
        stop: list[str] | None = None,
    ):
        self._decode = decode
        self._ids: list[int] = list((prompt_ids or [])[-_CONTEXT:])
        self._prefix = 0  # start of the window decoded for context
        self._read = len(self._ids)  # tokens whose text has been released to `_pending`
        self._stop = [s for s in (stop or []) if s]
        self._pending = ""  # decoded text not yet emitted (may hold a stop string's start)
        self.stopped: str | None = None  # the stop string that ended the text

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text now safe to emit ("" if none)."""
        if self.stopped is not None:
            return ""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._pending += full[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the stream: release what is held (incomplete bytes become U+FFFD)."""
        if self.stopped is None and self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            full = self._decode(self._ids[self._prefix :])
            self._pending += full[len(prefix_text) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped is not None:
            return ""
        text = self._pending
        hit = min(
            ((text.find(s), s) for s in self._stop if s in text), default=None, key=lambda t: t[0]
        )
        if hit is not None:
            self.stopped = hit[1]
            self._pending = ""
            return text[: hit[0]]
        keep = 0 if final else _held_suffix(text, self._stop)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
