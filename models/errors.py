"""Errors of model discovery and loading. Messages name the model, never a filesystem path."""

from __future__ import annotations


class ModelError(Exception):
    """Base of models/ errors; the message is safe to show a user."""


class ModelNotFoundError(ModelError):
    def __init__(self, name: str, known: list[str] | None = None):
        self.name = name
        self.known = known or []
        super().__init__(f"model '{name}' not found")


class InvalidModelNameError(ModelError):
    def __init__(self, name: str, reason: str = "invalid model name"):
        self.name = name
        super().__init__(f"{reason}: '{name}'")


class ModelLoadError(ModelError):
    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"model '{name}' failed to load: {reason}")


class InsufficientMemoryError(ModelError):
    """Weights plus KV would exceed the memory limit even after unloading idle models."""

    retry_after: float = 5.0


class ImportFailedError(ModelError):
    """A GGUF import or a pull failed (unsupported architecture, corrupt file, offline hub)."""


class ModelInUseError(ModelError):
    """The model has requests in flight (delete refused)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"model '{name}' is in use; try again when its requests finish")
