"""POST /v1/embeddings: OpenAI's request and response around server/embeddings.py."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import Request

from server.embeddings import Embedded, embed_texts
from server.errors import APIError, read_json, validate
from server.jobs import engine_of
from server.openai.protocol import EmbeddingRequest


def inputs_of(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's `input`: a string, strings, a token list or token lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) for v in value):
            return [value]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return value
    raise APIError(
        400, "'input' must be a string, a list of strings, or token id lists", param="input"
    )


def response_body(model: str, e: Embedded, encoding: str) -> dict[str, Any]:
    def encode(vec: list[float]) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        return vec

    data = [
        {"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(e.vectors)
    ]
    usage = {"prompt_tokens": e.prompt_tokens, "total_tokens": e.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


async def create_embeddings(request: Request) -> dict[str, Any]:
    req = validate(read_json(await request.body()), EmbeddingRequest)
    if req.encoding_format not in ("float", "base64"):
        raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    e = await embed_texts(
        engine_of(request), req.model, inputs_of(req.input), dimensions=req.dimensions
    )
    return response_body(req.model, e, req.encoding_format)
