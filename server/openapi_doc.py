"""The app's OpenAPI document, completed: request bodies and error responses as served.

Handlers read their bodies themselves (one error shape for every failure), so FastAPI cannot see
their schemas; this module adds each route's pydantic model as its request body, documents the
error statuses in each API's own shape (and drops FastAPI's 422, which is never sent), and the
streaming content types. /docs and the schema fuzz (tests/server/test_schema_fuzz.py) read it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from server.errors import api_of_path
from server.ollama import schemas as ollama
from server.openai import protocol as openai

_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": openai.ChatCompletionRequest,
    "/v1/completions": openai.CompletionRequest,
    "/v1/embeddings": openai.EmbeddingRequest,
    "/api/chat": ollama.ChatBody,
    "/api/generate": ollama.GenerateBody,
    "/api/show": ollama.ShowBody,
    "/api/pull": ollama.PullBody,
    "/api/create": ollama.CreateBody,
    "/api/copy": ollama.CopyBody,
    "/api/delete": ollama.DeleteBody,
    "/api/embed": ollama.EmbedBody,
    "/api/embeddings": ollama.EmbeddingsBody,
}
_SSE = {"/v1/chat/completions", "/v1/completions"}
_NDJSON = {"/api/chat", "/api/generate", "/api/pull", "/api/create"}
_EMPTY_OK = {"/api/copy", "/api/delete", "/api/blobs/{digest}"}  # 200/201 without a body
_ERRORS = {
    "400": "the request is invalid (the message names the field)",
    "401": "a missing or wrong API key",
    "403": "not allowed (a Host header from elsewhere, a path outside import_dirs)",
    "404": "no such model, route or blob",
    "413": "the body is over max_body_bytes",
    "429": "the queue is full; retry after Retry-After seconds",
    "503": "loading failed, not enough memory, or shutting down; retry later",
}
_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
_OLLAMA_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` return the completed document (built once, then cached)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(plain())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            _complete_op(path, method, op, components)
    return doc


def _complete_op(path: str, method: str, op: dict[str, Any], components: dict[str, Any]) -> None:
    model = _BODIES.get(path)
    if model is not None and method in ("post", "delete"):
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if path == "/api/blobs/{digest}" and method == "post":
        op["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    ok = responses.get("200") or {"description": "success"}
    if path in _EMPTY_OK:
        ok = {"description": "success (no body)"}
    else:
        any_body: dict[str, Any] = {"schema": {}}
        content = {"application/json": any_body}
        if path in _SSE:
            content["text/event-stream"] = any_body
        if path in _NDJSON:
            content["application/x-ndjson"] = any_body
        ok["content"] = content
    if path == "/api/blobs/{digest}" and method == "post":
        responses.pop("200", None)
        responses["201"] = {"description": "stored"}
        responses["507"] = _error("not enough disk space", path)
    else:
        responses["200"] = ok
    for status, why in _ERRORS.items():
        responses[status] = _error(why, path)
    if api_of_path(path) == "anthropic":  # Anthropic's "overloaded" is 529, not 503
        responses["529"] = responses.pop("503")


def _error(description: str, path: str) -> dict[str, Any]:
    api = api_of_path(path)
    schema = {"ollama": _OLLAMA_ERROR, "anthropic": _ANTHROPIC_ERROR}.get(api, _OPENAI_ERROR)
    return {"description": description, "content": {"application/json": {"schema": schema}}}
