"""Token logprobs in the two OpenAI shapes: chat's `content` list and completions' legacy arrays."""

from __future__ import annotations

import math
from typing import Any

from engine.types import TokenLogprob

FLOOR = -9999.0  # OpenAI's value for "very unlikely"; JSON has no -Infinity


def _lp(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    def entry(text: str, value: float) -> dict[str, Any]:
        return {
            "token": text,
            "logprob": _lp(value),
            "bytes": list(text.encode("utf-8", "replace")),
        }

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for _, s, v in t.top]}
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[TokenLogprob], start_offset: int = 0) -> dict[str, Any]:
    """Legacy arrays; text_offset counts characters from `start_offset`."""
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [_lp(t.logprob) for t in tokens],
        "top_logprobs": [{s: _lp(v) for _, s, v in t.top} for t in tokens],
        "text_offset": offsets,
    }
