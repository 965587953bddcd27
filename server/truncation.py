"""Fitting an over-long prompt into the context, as Ollama does (its `truncate`, on by default).

A chat drops its oldest messages first, keeping every system message and the latest message,
and never a tool result without the assistant turn that called it (Ollama's chatPrompt). A
prompt still too long, or a plain /api/generate prompt, keeps its first `num_keep` tokens and
its tail, cut to about half the context so the answer has room (Ollama's runner truncation).
The OpenAI-shaped APIs never truncate: they answer 400 context_length_exceeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

log = logging.getLogger("mlxd.server")


class _Turn(Protocol):
    role: str


M = TypeVar("M", bound=_Turn)


def _block_start(messages: Sequence[_Turn], i: int) -> int:
    """Where the message i's block starts: a tool result's block begins at the assistant turn
    whose calls it answers (Ollama's toolBlockStartIndex)."""
    if i <= 0 or i >= len(messages) or messages[i].role != "tool":
        return i
    start = i
    while start > 0 and messages[start - 1].role == "tool":
        start -= 1
    return start - 1 if messages[start - 1].role == "assistant" else i


def kept_messages(messages: Sequence[M], start: int) -> list[M]:
    """The system messages before `start`, then every message from it on."""
    return [m for m in messages[:start] if m.role == "system"] + list(messages[start:])


def fit_messages(
    messages: Sequence[M], render: Callable[[list[M]], list[int]], limit: int
) -> tuple[list[int], int]:
    """The rendered prompt (token ids) of the longest tail of `messages` whose prompt has at most
    `limit` tokens, and how many messages were dropped. The latest message always stays: if even
    it alone (with the system messages) is too long, that prompt is returned as it is."""
    ids = render(list(messages))
    if len(ids) <= limit or len(messages) < 2:
        return ids, 0
    # Dropping more never lengthens the prompt, so the first start that fits is found by
    # bisection: a few renders, not one per message of a long history.
    last = len(messages) - 1
    lo, hi = 1, last  # starts before lo are known too long; hi's prompt may be kept regardless
    best: list[int] | None = None
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = render(kept_messages(messages, _block_start(messages, mid)))
        if len(candidate) <= limit:
            hi, best = mid, candidate
        else:
            lo = mid + 1
    start = _block_start(messages, hi)
    if best is None:  # not even the latest message alone fits: it stays all the same
        best = render(kept_messages(messages, start))
    return best, start - sum(m.role == "system" for m in messages[:start])


def keep_head_and_tail(ids: list[int], context: int, num_keep: int, bos: int | None) -> list[int]:
    """`ids` cut to fit `context` with room to answer: the first num_keep tokens (after a BOS;
    -1: as many as fit) and the most recent ones, about half the context in all (Ollama's
    contextShiftPromptLimit)."""
    if len(ids) < context or context < 2:  # no room for a prompt token and an answer: a 400
        return ids
    keep = len(ids) if num_keep < 0 else max(num_keep, 0)
    if ids and bos is not None and ids[0] == bos:
        keep += 1
    keep = min(keep, context - 1)
    limit = context - max((context - keep) // 2, 1)
    return ids[:keep] + ids[len(ids) - (limit - keep) :] if limit > keep else ids[:limit]


def fit_prompt(
    ids: list[int], context: int, num_keep: int, bos: int | None, request_id: str
) -> list[int]:
    """keep_head_and_tail, logged like Ollama's warning when it cuts."""
    out = keep_head_and_tail(ids, context, num_keep, bos)
    if len(out) != len(ids):
        log.warning(
            "[%s] truncating input prompt: limit=%d prompt=%d keep=%d new=%d",
            request_id,
            context,
            len(ids),
            num_keep,
            len(out),
        )
    return out
