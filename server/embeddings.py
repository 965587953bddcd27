"""Embeddings, shared by Ollama's /api/embed and /api/embeddings and OpenAI's /v1/embeddings
(each API maps its own request and response; see server/ollama/router.py, server/openai/).

What they are: the engine runs the loaded generative model over each input and returns the
mean over tokens of its last hidden states (after the final norm), L2-normalized to unit length.
They are not from a dedicated embedding model: good enough for similarity between texts seen by
the same model, not comparable across models. `dimensions` keeps the first N values and
re-normalizes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from engine.api import EngineAPI
from server.errors import APIError

MAX_INPUTS = 2048  # OpenAI's limit; one request's inputs run back to back on the engine thread


@dataclass
class Embedded:
    vectors: list[list[float]]
    prompt_tokens: int
    load_time: float
    total_time: float


def _shorten(vec: list[float], dims: int | None) -> list[float]:
    if not dims or dims >= len(vec):
        return vec
    head = vec[:dims]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


async def embed_texts(
    engine: EngineAPI,
    model: str,
    inputs: list[str] | list[list[int]],
    truncate: bool = True,
    keep_alive: float | None = None,
    dimensions: int | None = None,
) -> Embedded:
    """Tokenize (unless given token ids), fit each input to the context, and embed them."""
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    if dimensions is not None and dimensions <= 0:
        raise APIError(400, "dimensions must be positive")
    started = time.monotonic()
    handle = await engine.get_model(model, keep_alive=keep_alive)
    load_time = time.monotonic() - started
    limit = handle.context_length
    batches: list[list[int]] = []
    for item in inputs:
        ids = handle.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "cannot embed an empty input")
        if limit and len(ids) > limit:
            if not truncate:
                raise APIError(400, "input length exceeds the context length")
            ids = ids[:limit]
        batches.append(ids)
    vectors = await engine.embed(model, batches) if batches else []
    return Embedded(
        vectors=[_shorten(list(v), dimensions) for v in vectors],
        prompt_tokens=sum(len(b) for b in batches),
        load_time=load_time,
        total_time=time.monotonic() - started,
    )
