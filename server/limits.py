"""Request limits every API enforces the same way: message and stop-string counts (from the
settings) and the context-length check. Each API passes its own parameter names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.errors import ContextLengthError
from server.errors import APIError, context_error
from server.settings import Settings


def check_messages(settings: Settings, count: int, param: str = "messages") -> None:
    if count > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages are allowed", param=param)


def stop_list(settings: Settings, stop: Any, param: str = "stop") -> list[str]:
    """A request's stop strings (one string or a list) as a list, within the configured count."""
    stops: Sequence[Any] = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > settings.max_stop_strings:
        raise APIError(
            400, f"at most {settings.max_stop_strings} stop strings are allowed", param=param
        )
    return [str(s) for s in stops if s]


def check_context(prompt_tokens: int, max_tokens: int, context: int, param: str) -> None:
    """400 context_length_exceeded (engine/errors.py's text) when the two do not fit."""
    if prompt_tokens + max_tokens > context:
        raise context_error(ContextLengthError(prompt_tokens, max_tokens, context), param)


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, context: int, param: str, default: int = 0
) -> int:
    """The completion budget. Absent, `default` (the default_max_tokens setting; 0: what the
    context has left), never past the context (at least one token must fit)."""
    wanted = requested if requested is not None else default_budget(default, prompt_tokens, context)
    check_context(prompt_tokens, wanted, context, param)
    return wanted


def default_budget(default: int, prompt_tokens: int, context: int) -> int:
    """A request's budget when it names none: the server's default, or what the context has left."""
    room = max(context - prompt_tokens, 1)
    return min(default, room) if default > 0 else room
