"""Ollama request knobs -> engine values: keep_alive durations, `options` -> SamplingParams, timings."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from engine.types import RequestMetrics, SamplingParams
from server.errors import APIError

# Ollama's defaults where they differ from the OpenAI-shaped SamplingParams defaults.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
}

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class OptionError(APIError):
    """A request knob has a value we cannot use (400); the message is shown to the user."""

    def __init__(self, message: str):
        super().__init__(400, message)


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from Ollama's keep_alive: a number (seconds) or a Go duration ("5m", "1h30m", "-1").

    None: the model's default; any negative value: forever (-1.0); 0: unload after the request.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise OptionError("keep_alive must be a duration like '5m' or a number of seconds")
    if isinstance(value, int | float):
        return _bounded(-1.0 if value < 0 else float(value), value)
    if not isinstance(value, str):
        raise OptionError("keep_alive must be a duration like '5m' or a number of seconds")
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:  # a bare number is seconds, as in Ollama
        seconds = float(body)
    except ValueError:
        seconds = _parse_go_duration(body, value)
    return _bounded(-1.0 if sign < 0 and seconds > 0 else seconds, value)


KEEP_ALIVE_MAX = 100 * 365 * 86400.0  # longer is forever: an expiry date must stay a date


def _bounded(seconds: float, original: Any) -> float:
    if not math.isfinite(seconds):  # "nan" and "inf" parse as floats
        raise OptionError(f"invalid keep_alive: {str(original)[:32]!r}")
    return -1.0 if seconds > KEEP_ALIVE_MAX else seconds


def _parse_go_duration(body: str, original: str) -> float:
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise OptionError(f"invalid keep_alive duration: {original!r}")
    return total


def budget_options(options: dict[str, Any]) -> tuple[int | None, int | None]:
    """(num_predict, num_ctx) from `options`; num_predict < 0 or absent: None, to the end of
    the context (which num_ctx caps, never above the model's: server/chat.py)."""
    try:
        num_predict = options.get("num_predict")
        num_ctx = options.get("num_ctx")
        predict = None if num_predict is None or int(num_predict) < 0 else int(num_predict)
        ctx = None if num_ctx is None else int(num_ctx)
    except (TypeError, ValueError) as e:
        raise OptionError(f"invalid options: {e}") from None
    if ctx is not None and ctx <= 0:
        raise OptionError("num_ctx must be positive")
    return predict, ctx


def keep_option(options: dict[str, Any]) -> int:
    """num_keep: the prompt's first tokens a truncation keeps (Ollama's default 4; -1: all)."""
    value = options.get("num_keep")
    return 4 if value is None else int(value)


def sampling_params(options: dict[str, Any] | None, max_tokens: int) -> SamplingParams:
    """Map Ollama `options` onto SamplingParams, filling Ollama's defaults for what is absent."""
    opts = {**OLLAMA_DEFAULTS, **{k: v for k, v in (options or {}).items() if v is not None}}
    try:
        stop = opts.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(opts["temperature"]),
            top_p=float(opts["top_p"]),
            top_k=int(opts["top_k"]),
            min_p=float(opts["min_p"]),
            repetition_penalty=float(opts["repeat_penalty"]),
            repeat_last_n=int(opts["repeat_last_n"]),
            presence_penalty=float(opts.get("presence_penalty", 0.0)),
            frequency_penalty=float(opts.get("frequency_penalty", 0.0)),
            seed=None if opts.get("seed") is None else int(opts["seed"]),
            stop=[str(s) for s in stop],
        )
    except (TypeError, ValueError) as e:
        raise OptionError(f"invalid options: {e}") from None
    _check_ranges(params)
    return params


def _check_ranges(p: SamplingParams) -> None:
    if p.temperature < 0:
        raise OptionError("temperature must be >= 0")
    if not 0.0 <= p.top_p <= 1.0:
        raise OptionError("top_p must be between 0 and 1")
    if not 0.0 <= p.min_p <= 1.0:
        raise OptionError("min_p must be between 0 and 1")
    if p.top_k < 0:
        raise OptionError("top_k must be >= 0")
    if p.repetition_penalty <= 0:
        raise OptionError("repeat_penalty must be > 0")
    if p.repeat_last_n < -1:
        raise OptionError("repeat_last_n must be >= -1")


def ns(seconds: float) -> int:
    """Seconds -> integer nanoseconds, as every Ollama duration is."""
    return max(int(round(seconds * 1e9)), 0)


def final_stats(metrics: RequestMetrics | None, total: float, load: float) -> dict[str, int]:
    """The timing and count fields of a final chat/generate object.

    total and load are measured by the handler (load includes get_model); the rest come from the
    engine's metrics.
    """
    m = metrics or RequestMetrics()
    return {
        "total_duration": ns(max(total, m.total_time)),
        "load_duration": ns(load + m.load_time),
        "prompt_eval_count": m.prompt_tokens,
        "prompt_eval_duration": ns(m.prefill_time),
        "eval_count": m.completion_tokens,
        "eval_duration": ns(m.decode_time),
    }


def timestamp(unix: float | None = None) -> str:
    """RFC 3339 UTC with microseconds, as Ollama's created_at / modified_at / expires_at."""
    dt = datetime.now(timezone.utc) if unix is None else datetime.fromtimestamp(unix, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
