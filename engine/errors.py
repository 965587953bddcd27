"""Exceptions the engine raises to its callers; server/errors.py maps each to each API's shape."""

from __future__ import annotations

from models.errors import (  # re-exported: the server sees them through the engine
    ImportFailedError,
    InsufficientMemoryError,
    InvalidModelNameError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
)

__all__ = [
    "ContextLengthError",
    "EngineError",
    "EngineShuttingDownError",
    "EngineUnavailableError",
    "ImportFailedError",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "InvalidModelNameError",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotServedError",
    "GroupFailedError",
    "QueueFullError",
]


class EngineError(Exception):
    """Base of every error the engine reports to a caller. The message is safe to show a user."""


class InvalidRequestError(EngineError):
    """The request itself is wrong (an empty prompt, an unknown token id, ...)."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


class QueueFullError(EngineError):
    """The waiting queue is at its bound."""

    retry_after: float = 1.0


class ContextLengthError(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion)."
        )


class EngineShuttingDownError(EngineError):
    retry_after: float = 5.0

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class EngineUnavailableError(EngineError):
    """The engine can't serve requests now (its thread has stopped); /health says so."""

    retry_after: float = 5.0

    def __init__(self) -> None:
        super().__init__("the engine is unavailable; retry later")


class NotServedError(ModelNotFoundError):
    """A distributed group serves one model; another was asked for."""

    def __init__(self, name: str, served: str):
        super().__init__(name, [served])
        Exception.__init__(
            self, f"model '{name}' is not served here: this server runs {served} across its ranks"
        )


class GroupFailedError(EngineShuttingDownError):
    """A rank of the distributed group died or hung: the server is exiting."""

    def __init__(self, reason: str):
        super().__init__()
        Exception.__init__(self, f"the distributed group failed ({reason}); the server is exiting")
