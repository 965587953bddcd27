"""The Ollama-compatible API: `router` is included by server/app.py.

Handlers reach the engine through `request.app.state.engine` (and settings through
`request.app.state.settings`). Errors raise and server/errors.py shapes them as `{"error": ...}`;
once a stream has started, a failure becomes its last NDJSON line.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.embeddings import embed_texts
from server.errors import APIError
from server.jobs import engine_of, respond, respond_events, settings_of
from server.ollama import management as mgmt
from server.ollama.generation import prepare_chat, prepare_generate
from server.ollama.options import ns, parse_keep_alive
from server.ollama.schemas import (
    ChatBody,
    CopyBody,
    CreateBody,
    DeleteBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    PullBody,
    ShowBody,
    parse_body,
)
from server.sse import ndjson_line

router = APIRouter()

# Clients (Open WebUI, editor plugins) gate features on Ollama's version; we claim a recent one.
OLLAMA_COMPAT_VERSION = "0.12.0"


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    body = await parse_body(request, ChatBody)
    prepared = await prepare_chat(engine_of(request), settings_of(request), body)
    if isinstance(prepared, dict):  # no messages: the model was loaded or unloaded
        return _single(prepared, body.stream)
    return await respond(request, *prepared, body.stream)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    body = await parse_body(request, GenerateBody)
    prepared = await prepare_generate(engine_of(request), settings_of(request), body)
    if isinstance(prepared, dict):  # no prompt: the model was loaded or unloaded
        return _single(prepared, body.stream)
    return await respond(request, *prepared, body.stream)


def _single(event: dict[str, Any], stream: bool) -> Response:
    """A one-object answer: a one-line NDJSON stream when the client asked for a stream."""
    if stream:
        return Response(ndjson_line(event), media_type="application/x-ndjson")
    return JSONResponse(event)


@router.get("/api/tags")
async def tags(request: Request) -> JSONResponse:
    models = sorted(engine_of(request).list_models(), key=lambda s: -s.modified_at)
    return JSONResponse({"models": [mgmt.tag_entry(s) for s in models]})


@router.get("/api/ps")
async def ps(request: Request) -> JSONResponse:
    on_gpu = _on_gpu()
    engine = engine_of(request)
    group = engine.group_status()
    entries = []
    for s in engine.running_models():
        entry = mgmt.ps_entry(s, on_gpu)
        if group is not None and group.model == s.name:
            entry["distributed"] = mgmt.group_entry(group)
        entries.append(entry)
    return JSONResponse({"models": entries})


def _on_gpu() -> bool:
    from engine.doctor import device_kind  # cheap and cached; needs mlx, which the engine loaded

    return device_kind() == "gpu"


@router.post("/api/show")
async def show(request: Request) -> JSONResponse:
    body = await parse_body(request, ShowBody)
    return JSONResponse(await mgmt.show_model(engine_of(request), body.model))


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    body = await parse_body(request, PullBody)
    events = mgmt.pull_events(engine_of(request), body.model)
    return await respond_events(request, "ollama", events, body.stream)


@router.post("/api/create")
async def create(request: Request) -> Response:
    body = await parse_body(request, CreateBody)
    settings = request.app.state.settings
    events = mgmt.create_events(engine_of(request), body, settings.import_dirs, settings.models_dir)
    return await respond_events(request, "ollama", events, body.stream)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    body = await parse_body(request, CopyBody, require_model=False)
    if not body.source or not body.destination:
        raise APIError(400, "source and destination are required")
    await engine_of(request).copy_model(body.source, body.destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await parse_body(request, DeleteBody)
    await engine_of(request).delete_model(body.model)
    return Response(status_code=200)


@router.get("/api/version")
async def version() -> JSONResponse:
    try:
        ours = metadata.version("mlxd")
    except metadata.PackageNotFoundError:
        ours = "dev"
    return JSONResponse({"version": OLLAMA_COMPAT_VERSION, "mlxd": ours})


@router.post("/api/embed")
async def embed(request: Request) -> JSONResponse:
    body = await parse_body(request, EmbedBody)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs or inputs == [""]:
        return JSONResponse({"model": body.model, "embeddings": []})
    keep_alive = parse_keep_alive(body.keep_alive)
    e = await embed_texts(
        engine_of(request), body.model, inputs, body.truncate, keep_alive, body.dimensions
    )
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": e.vectors,
            "total_duration": ns(e.total_time),
            "load_duration": ns(e.load_time),
            "prompt_eval_count": e.prompt_tokens,
        }
    )


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request) -> JSONResponse:
    body = await parse_body(request, EmbeddingsBody)
    if not body.prompt:
        return JSONResponse({"embedding": []})
    keep_alive = parse_keep_alive(body.keep_alive)
    e = await embed_texts(engine_of(request), body.model, [body.prompt], True, keep_alive)
    return JSONResponse({"embedding": e.vectors[0]})
