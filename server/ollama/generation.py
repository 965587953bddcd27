"""/api/chat and /api/generate as async streams of Ollama-shaped dicts.

Each `*_events` generator raises (APIError, engine errors) before its first item when the
request is rejected, so the router can still answer with a status code; after that, a failure
raises from the iteration and the router ends the NDJSON stream with an `{"error": ...}` line.
The CLI's in-process mode iterates the same generators.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

from engine.api import EngineAPI, ModelHandle
from engine.errors import ContextLengthError
from engine.types import FinishReason, GenerateRequest, RequestOutput
from server.errors import APIError
from server.ollama.options import (
    final_stats,
    parse_keep_alive,
    sampling_params,
    timestamp,
    token_budget,
)
from server.ollama.prompt import chat_prompt, generate_prompt
from server.ollama.schemas import ChatBody, GenerateBody

Event = dict[str, Any]


def check_unsupported(
    model: str, fmt: Any, think: Any, tools: Any = None, images: bool = False, suffix: str = ""
) -> None:
    """Refuse, with Ollama's 400, features this server does not have yet."""
    if fmt not in (None, ""):
        raise APIError(400, "'format' (structured output) is not supported yet")
    if think not in (None, False, "", "false"):
        raise APIError(400, f'"{model}" does not support thinking')
    if tools:
        raise APIError(400, f'"{model}" does not support tools')
    if images:
        raise APIError(400, f'"{model}" does not support images')
    if suffix:
        raise APIError(400, f'"{model}" does not support insert')


async def load_or_unload(engine: EngineAPI, model: str, keep_alive: float | None) -> Event:
    """An empty prompt: keep_alive 0 unloads the model, anything else loads it (Ollama's way)."""
    engine.model_status(model)  # 404 for an unknown model, loaded or not
    if keep_alive == 0:
        await engine.unload_model(model)
        reason = "unload"
    else:
        await engine.get_model(model, keep_alive=keep_alive)
        reason = "load"
    return {"model": model, "created_at": timestamp(), "done": True, "done_reason": reason}


@dataclass
class _Run:
    """One generation: the loaded model, its tokenized prompt and what we measured around it."""

    handle: ModelHandle
    prompt_ids: list[int]
    started: float
    load_time: float
    generated: list[int] = field(default_factory=list)


async def _load(
    engine: EngineAPI, model: str, keep_alive: float | None
) -> tuple[ModelHandle, float]:
    t = time.monotonic()
    handle = await engine.get_model(model, keep_alive=keep_alive)
    return handle, time.monotonic() - t


async def _outputs(
    engine: EngineAPI, run: _Run, model: str, options: dict[str, Any], keep_alive: float | None
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one run; errors and aborts raise."""
    budget = token_budget(options, len(run.prompt_ids), run.handle.context_length)
    if budget.max_tokens <= 0 and budget.context_length > 0:
        raise ContextLengthError(len(run.prompt_ids), 1, budget.context_length)
    request = GenerateRequest(
        request_id=f"ollama-{uuid.uuid4().hex}",
        model=model,
        prompt_token_ids=run.prompt_ids,
        params=sampling_params(options, budget.max_tokens),
        keep_alive=keep_alive,
    )
    # Leaving early (client gone, error) closes the stream, which aborts the engine request.
    stream = cast(AsyncGenerator[RequestOutput, None], engine.generate(request))
    async with aclosing(stream) as outputs:
        async for out in outputs:
            if out.finish_reason is FinishReason.ERROR:
                raise APIError(500, out.error or "generation failed")
            if out.finish_reason is FinishReason.ABORT:
                raise APIError(503, "the request was aborted")
            run.generated.extend(out.token_ids)
            yield out


def _final(out: RequestOutput, run: _Run) -> Event:
    reason = out.finish_reason.value if isinstance(out.finish_reason, FinishReason) else "stop"
    stats = final_stats(out.metrics, time.monotonic() - run.started, run.load_time)
    return {"done": True, "done_reason": reason, **stats}


async def chat_events(engine: EngineAPI, body: ChatBody) -> AsyncIterator[Event]:
    """Stream /api/chat: message fragments, then a final object with done_reason and timings."""
    images = any(m.images for m in body.messages)
    check_unsupported(body.model, body.format, body.think, body.tools, images)
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.messages:
        event = await load_or_unload(engine, body.model, keep_alive)
        yield {**event, "message": {"role": "assistant", "content": ""}}
        return
    started = time.monotonic()
    handle, load_time = await _load(engine, body.model, keep_alive)
    messages = [
        m.model_dump(include={"role", "content", "tool_calls"}, exclude_none=True)
        for m in body.messages
    ]
    prompt = chat_prompt(handle.tokenizer, messages)
    ids = handle.tokenizer.encode(prompt.text, add_special_tokens=prompt.add_special_tokens)
    run = _Run(handle, ids, started, load_time)
    async for out in _outputs(engine, run, body.model, body.options, keep_alive):
        head = {"model": body.model, "created_at": timestamp()}
        if out.text:
            yield {**head, "message": {"role": "assistant", "content": out.text}, "done": False}
        if out.finished:
            yield {**head, "message": {"role": "assistant", "content": ""}, **_final(out, run)}


async def generate_events(engine: EngineAPI, body: GenerateBody) -> AsyncIterator[Event]:
    """Stream /api/generate: response fragments, then a final object (with `context` unless raw)."""
    check_unsupported(
        body.model, body.format, body.think, images=bool(body.images), suffix=body.suffix
    )
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.prompt and not body.context:
        yield {**await load_or_unload(engine, body.model, keep_alive), "response": ""}
        return
    started = time.monotonic()
    handle, load_time = await _load(engine, body.model, keep_alive)
    prompt = generate_prompt(handle.tokenizer, body.prompt, body.system, body.template, body.raw)
    ids = list(body.context or []) if not body.raw else []
    if prompt.text:
        ids += handle.tokenizer.encode(
            prompt.text, add_special_tokens=prompt.add_special_tokens and not ids
        )
    run = _Run(handle, ids, started, load_time)
    async for out in _outputs(engine, run, body.model, body.options, keep_alive):
        head = {"model": body.model, "created_at": timestamp()}
        if out.text:
            yield {**head, "response": out.text, "done": False}
        if out.finished:
            final = {**head, "response": "", **_final(out, run)}
            if not body.raw:
                final["context"] = run.prompt_ids + run.generated
            yield final


async def collect(events: AsyncIterator[Event], first: Event) -> Event:
    """Fold a stream into Ollama's `stream: false` answer: one object with the whole text."""
    parts: list[str] = []
    last = first
    item: Event | None = first
    while item is not None:
        last = item
        if "message" in item:
            parts.append(item["message"].get("content", ""))
        elif "response" in item:
            parts.append(item["response"])
        item = await anext(events, None)
    text = "".join(parts)
    if "message" in last:
        return {**last, "message": {**last["message"], "content": text}}
    return {**last, "response": text}
