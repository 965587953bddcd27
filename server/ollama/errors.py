"""Ollama's error shape for streams; status codes and messages come from server/errors.py."""

from __future__ import annotations

from typing import Any

from server.errors import APIError, from_exception

__all__ = ["APIError", "error_line"]


def error_line(exc: BaseException) -> dict[str, Any]:
    """The `{"error": ...}` line a stream ends with when it fails after its first line."""
    return from_exception(exc).ollama_body()
