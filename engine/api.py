"""The engine's public interface for the server (and its fakes in tests); no MLX here.

Contract for the server (and its fakes in tests):
- `await engine.start()` / `await engine.shutdown(drain_timeout)`; `engine.alive` for /health.
- `await engine.get_model(name)` -> ModelHandle (loads on demand). Its `tokenizer` has
  `encode(text, add_special_tokens=True) -> list[int]`, `decode(ids) -> str`,
  `apply_chat_template(messages: list[dict], add_generation_prompt=True) -> str`,
  `chat_template: str | None`, `bos_token_id`, `eos_token_ids: set[int]`.
- `engine.generate(GenerateRequest)` is an async iterator of RequestOutput. Errors that reject the
  request (ModelNotFoundError, ContextLengthError, QueueFullError, ...) raise at the first
  `__anext__`, before any output; leaving the iteration early (break, aclose, cancellation)
  aborts the request and frees its KV.
- Model management: list_models, model_status, unload_model, import_gguf, pull_model, copy_model,
  delete_model; `embed`.
- What the engine measures, for the server to render (it never wraps the engine): each
  request's RequestMetrics on its last output, ModelHandle.load_time for each load, and
  `stats()`, a snapshot of engine-wide counts and gauges.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.types import EngineStats, GenerateRequest, GroupStatus, ModelStatus, RequestOutput


@dataclass
class ModelHandle:
    """A loaded model as the server sees it: its name, metadata and tokenizer (no weights)."""

    name: str
    status: ModelStatus
    tokenizer: Any  # models.tokenizer.Tokenizer; typed loosely so the server never imports models
    load_time: float = 0.0  # seconds this get_model spent loading weights; 0: already loaded

    @property
    def context_length(self) -> int:
        return self.status.context_length


class EngineAPI:
    """The interface the server uses. AsyncEngine implements it; tests/server fakes it.

    Every method is safe to call from the event loop; none blocks it.
    """

    alive: bool  # the engine thread is running (for /health)

    async def start(self) -> None:
        """Start the engine thread; preload configured models; import the default model if absent."""
        raise NotImplementedError

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Refuse new requests (EngineShuttingDownError), let running ones finish for up to
        drain_timeout seconds, abort the rest (FinishReason.ABORT), unload, stop the thread."""
        raise NotImplementedError

    # --- models -------------------------------------------------------------------------------
    def list_models(self) -> list[ModelStatus]:
        """Every model on disk (no weights read), with loaded state."""
        raise NotImplementedError

    def knows_model(self, name: str) -> bool:
        """On disk, or a bundled model the registry can import offline (the default one)."""
        raise NotImplementedError

    def model_status(self, name: str) -> ModelStatus:
        """One model's status; raises ModelNotFoundError / InvalidModelNameError."""
        raise NotImplementedError

    def running_models(self) -> list[ModelStatus]:
        """Models currently loaded (for /api/ps), with weight bytes and expires_at."""
        raise NotImplementedError

    async def get_model(self, name: str, keep_alive: float | None = None) -> ModelHandle:
        """Load the model if needed (ModelLoadError, InsufficientMemoryError, ModelNotFoundError)."""
        raise NotImplementedError

    async def unload_model(self, name: str) -> None:
        """Unload now if idle, else as soon as its requests end."""
        raise NotImplementedError

    async def import_gguf(self, path: str, name: str, progress: Any = None) -> ModelStatus:
        """Import a GGUF file as `name`. progress(done: int, total: int, what: str) is called from a
        worker thread. Raises ImportFailedError / InvalidModelNameError."""
        raise NotImplementedError

    async def import_folder(self, path: str, name: str) -> ModelStatus:
        """Copy a Hugging Face / MLX safetensors folder in as `name`."""
        raise NotImplementedError

    async def pull_model(self, name: str, progress: Any = None) -> ModelStatus:
        """Fetch `name` (a hub repo id like org/repo, or a known bundled model such as smollm2:135m)."""
        raise NotImplementedError

    async def copy_model(self, src: str, dst: str) -> None:
        raise NotImplementedError

    async def delete_model(self, name: str) -> None:
        raise NotImplementedError

    # --- inference ----------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; see the module docstring for errors and cancellation."""
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def embed(self, model: str, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled last hidden states of each token list, L2-normalized."""
        raise NotImplementedError

    def group_status(self) -> GroupStatus | None:
        """The distributed group this engine serves across (ranks, split, per-rank memory);
        None in one process."""
        return None

    def stats(self) -> EngineStats:
        """A snapshot taken between engine steps (never a structure read mid-step)."""
        raise NotImplementedError
