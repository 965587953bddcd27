"""The Ollama-compatible API: `router` is included by server/app.py.

Handlers reach the engine through `request.app.state.engine` (and settings through
`request.app.state.settings`). Errors raise and server/errors.py shapes them as `{"error": ...}`;
once a stream has started, a failure becomes its last NDJSON line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from engine.api import EngineAPI
from server.errors import APIError
from server.ollama import management as mgmt
from server.ollama.embed import (
    embed_texts,
    ollama_embed_response,
    openai_embed_response,
    openai_inputs,
)
from server.ollama.errors import error_line
from server.ollama.generation import chat_events, collect, generate_events
from server.ollama.schemas import (
    ChatBody,
    CopyBody,
    CreateBody,
    DeleteBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    OpenAIEmbedBody,
    PullBody,
    ShowBody,
    parse_body,
)
from server.sse import ndjson_response, ndjson_stream

router = APIRouter()

# Clients (Open WebUI, editor plugins) gate features on Ollama's version; we claim a recent one.
OLLAMA_COMPAT_VERSION = "0.12.0"
Event = dict[str, Any]


def _engine(request: Request) -> EngineAPI:
    return request.app.state.engine


def _limit(request: Request, name: str, default: int) -> int:
    settings = getattr(request.app.state, "settings", None)
    return int(getattr(settings, name, default))


async def _answer(events: AsyncIterator[Event], stream: bool) -> Response:
    """Stream as NDJSON or fold into one object. The first item is awaited here, so a rejected
    request still gets its status code rather than a 200 with an error line."""
    first = await anext(events)
    if not stream:
        return JSONResponse(await _fold(events, first))

    async def chain() -> AsyncIterator[Event]:
        yield first
        async for item in events:
            yield item

    return ndjson_response(ndjson_stream(chain(), error_line))


async def _fold(events: AsyncIterator[Event], first: Event) -> Event:
    if "message" in first or "response" in first:
        return await collect(events, first)
    last = first
    async for item in events:
        last = item
    return last


def _check_limits(request: Request, messages: int, stops: Any) -> None:
    if messages > _limit(request, "max_messages", 2048):
        raise APIError(400, "too many messages")
    if isinstance(stops, list) and len(stops) > _limit(request, "max_stop_strings", 16):
        raise APIError(400, "too many stop strings")


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    body = await parse_body(request, ChatBody)
    _check_limits(request, len(body.messages), body.options.get("stop"))
    return await _answer(chat_events(_engine(request), body), body.stream)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    body = await parse_body(request, GenerateBody)
    _check_limits(request, 0, body.options.get("stop"))
    return await _answer(generate_events(_engine(request), body), body.stream)


@router.get("/api/tags")
async def tags(request: Request) -> JSONResponse:
    models = sorted(_engine(request).list_models(), key=lambda s: -s.modified_at)
    return JSONResponse({"models": [mgmt.tag_entry(s) for s in models]})


@router.get("/api/ps")
async def ps(request: Request) -> JSONResponse:
    on_gpu = _on_gpu()
    models = _engine(request).running_models()
    return JSONResponse({"models": [mgmt.ps_entry(s, on_gpu) for s in models]})


def _on_gpu() -> bool:
    from engine.doctor import device_kind  # cheap and cached; needs mlx, which the engine loaded

    return device_kind() == "gpu"


@router.post("/api/show")
async def show(request: Request) -> JSONResponse:
    body = await parse_body(request, ShowBody)
    return JSONResponse(await mgmt.show_model(_engine(request), body.model))


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    body = await parse_body(request, PullBody)
    return await _answer(mgmt.pull_events(_engine(request), body.model), body.stream)


@router.post("/api/create")
async def create(request: Request) -> Response:
    body = await parse_body(request, CreateBody)
    return await _answer(mgmt.create_events(_engine(request), body), body.stream)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    body = await parse_body(request, CopyBody, require_model=False)
    if not body.source or not body.destination:
        raise APIError(400, "source and destination are required")
    await _engine(request).copy_model(body.source, body.destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await parse_body(request, DeleteBody)
    await _engine(request).delete_model(body.model)
    return Response(status_code=200)


@router.get("/api/version")
async def version() -> JSONResponse:
    try:
        ours = metadata.version("mlxd")
    except metadata.PackageNotFoundError:
        ours = "dev"
    return JSONResponse({"version": OLLAMA_COMPAT_VERSION, "mlxd": ours})


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.post("/api/embed")
async def embed(request: Request) -> JSONResponse:
    body = await parse_body(request, EmbedBody)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs or inputs == [""]:
        return JSONResponse({"model": body.model, "embeddings": []})
    e = await embed_texts(
        _engine(request), body.model, inputs, body.truncate, body.keep_alive, body.dimensions
    )
    return JSONResponse(ollama_embed_response(body.model, e))


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request) -> JSONResponse:
    body = await parse_body(request, EmbeddingsBody)
    if not body.prompt:
        return JSONResponse({"embedding": []})
    e = await embed_texts(_engine(request), body.model, [body.prompt], True, body.keep_alive)
    return JSONResponse({"embedding": e.vectors[0]})


@router.post("/v1/embeddings")
async def embeddings_openai(request: Request) -> JSONResponse:
    """OpenAI's embeddings endpoint, served from the same engine.embed (errors in OpenAI's shape)."""
    body = await parse_body(request, OpenAIEmbedBody, require_model=False)
    if not body.model:
        raise APIError(400, "'model' is required", param="model")
    if body.encoding_format not in ("float", "base64"):
        raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    inputs = openai_inputs(body.input)
    e = await embed_texts(_engine(request), body.model, inputs, dimensions=body.dimensions)
    return JSONResponse(openai_embed_response(body.model, e, body.encoding_format))
