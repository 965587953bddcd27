"""Embeddings from a generative model: the mean of its last hidden states, L2-normalized.

These are not a trained embedding model's vectors; they serve similarity search passably and
match what Ollama returns for a chat model's /api/embed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def embed_tokens(model: nn.Module, token_ids: list[int]) -> list[float]:
    inner = getattr(model, "model", None) or getattr(model, "language_model", None)
    if inner is None:
        raise ValueError("this model's architecture does not expose hidden states")
    hidden = inner(mx.array([token_ids], dtype=mx.int32))  # [1, L, D], after the final norm
    pooled = hidden[0].astype(mx.float32).mean(axis=0)
    pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
    return pooled.tolist()
