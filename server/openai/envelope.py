"""What every OpenAI response and stream chunk carries: the envelope, usage and x_timings."""

from __future__ import annotations

import time
from typing import Any

from engine.types import FinishReason, RequestMetrics
from server.jobs import Usage

FINGERPRINT = "fp_mlxd"


def envelope(obj: str, job_id: str, model: str, include_usage: bool = False) -> dict[str, Any]:
    """The fields a response object, and every chunk of a stream, starts with (a stream's usage
    is null until its final usage chunk)."""
    base: dict[str, Any] = {
        "id": job_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }
    if include_usage:
        base["usage"] = None
    return base


def usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def finish_reason(reason: FinishReason | None, tool_calls: bool = False) -> str:
    if reason == FinishReason.LENGTH:
        return "length"
    return "tool_calls" if tool_calls else "stop"


def timings(metrics: list[RequestMetrics | None]) -> dict[str, Any] | None:
    """The `x_timings` extension: mlxd's measurements of this response (the first choice's rates)."""
    known = [m for m in metrics if m is not None]
    if not known:
        return None
    m = known[0]
    return {
        "prompt_tokens": m.prompt_tokens,
        "cached_tokens": m.cached_tokens,
        "completion_tokens": sum(k.completion_tokens for k in known),
        "prefill_tokens_per_second": round(m.prefill_tps, 2),
        "decode_tokens_per_second": round(m.decode_tps, 2),
        "queue_ms": round(m.queue_time * 1000, 2),
        "load_ms": round(m.load_time * 1000, 2),
        "ttft_ms": round(m.ttft * 1000, 2),
        "total_ms": round(m.total_time * 1000, 2),
    }


def with_timings(body: dict[str, Any], metrics: list[RequestMetrics | None]) -> dict[str, Any]:
    """Add the `x_timings` extension (a response, or a choice's last chunk)."""
    timing = timings(metrics)
    if timing:
        body["x_timings"] = timing
    return body
