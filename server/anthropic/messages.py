"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, a converter onto
the internal chat request (server/chat.py) rendered from the job runner's output stream.

Content blocks in answer order: `thinking` (the model's reasoning), `text`, then one `tool_use`
per call (`input` an object). Usage as Anthropic counts it: the prompt is `input_tokens` plus
`cache_read_input_tokens` (the part the prefix cache served), so their sum is what count_tokens
reports for the same request. A stream's message_start cannot know the cached part yet (the
prompt is not read); its message_delta carries the final split, as Anthropic's does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.types import FinishReason, RequestOutput
from server.anthropic.convert import chat_request, output_spec, template_messages
from server.anthropic.protocol import CountTokensRequest, MessagesRequest
from server.chat import chat_job, render_chat
from server.errors import API, read_json, validate
from server.jobs import Choice, Job, JobResult, engine_of, respond, settings_of
from server.limits import check_messages

Event = dict[str, Any]
PING = {"type": "ping"}


async def create_message(request: Request) -> Response:
    req = validate(read_json(await request.body()), MessagesRequest)
    settings = settings_of(request)
    job = await chat_job(engine_of(request), settings, chat_request(req, settings))
    return await respond(request, job, MessagesRenderer(job), req.stream)


async def count_tokens(request: Request) -> JSONResponse:
    req = validate(read_json(await request.body()), CountTokensRequest)
    output = output_spec(req)
    messages, prefill = template_messages(req)
    check_messages(settings_of(request), len(messages))
    handle = await engine_of(request).get_model(req.model)
    ids = render_chat(handle, messages, False, output, prefill)
    return JSONResponse({"input_tokens": len(ids)})


def thinking_block(text: str) -> Event:
    # No signature: the thinking comes from a local model, nothing to verify it against.
    return {"type": "thinking", "thinking": text, "signature": ""}


def tool_use_block(call_id: str, name: str, arguments: str | None) -> Event:
    """A tool_use block; arguments None: just opened (its input streams as partial JSON)."""
    try:
        input = json.loads(arguments or "{}")
    except ValueError:
        input = {}
    return {
        "type": "tool_use",
        "id": f"toolu_{call_id.removeprefix('call_')}",
        "name": name,
        "input": input,
    }


@dataclass
class _Blocks:
    """The stream's content blocks: one open at a time, indexes in order."""

    index: int = -1
    kind: str | None = None

    def close(self) -> Iterator[Event]:
        if self.kind is not None:
            yield {"type": "content_block_stop", "index": self.index}
            self.kind = None

    def delta(
        self, kind: str, start: Event, delta: Event | None, new: bool = False
    ) -> Iterator[Event]:
        """A delta for a `kind` block, opening one (and closing the last) when needed or `new`."""
        if self.kind != kind or new:
            yield from self.close()
            self.index += 1
            self.kind = kind
            yield {"type": "content_block_start", "index": self.index, "content_block": start}
        if delta is not None:
            yield {"type": "content_block_delta", "index": self.index, "delta": delta}


@dataclass
class MessagesRenderer:
    """A job's output as an Anthropic message, or as its stream of named events."""

    job: Job
    api: API = "anthropic"
    blocks: _Blocks = field(default_factory=_Blocks)

    def _head(self) -> Event:
        return {"id": self.job.id, "type": "message", "role": "assistant", "model": self.job.model}

    def _stop(self, choice: Choice) -> Event:
        matched = choice.stop_matched
        stops = self.job.requests[0].params.stop
        stop = matched if isinstance(matched, str) and matched in stops else None
        if choice.tool_calls:
            reason = "tool_use"
        elif choice.finish_reason == FinishReason.LENGTH:
            reason = "max_tokens"
        else:
            reason = "stop_sequence" if stop is not None else "end_turn"
        return {"stop_reason": reason, "stop_sequence": stop}

    def _usage(self, result: JobResult | None) -> Event:
        usage = result.usage() if result is not None else None
        cached = usage.cached_tokens if usage else 0
        return {
            "input_tokens": len(self.job.requests[0].prompt_token_ids) - cached,
            "output_tokens": usage.completion_tokens if usage else 0,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }

    def opening(self) -> Iterable[Event]:
        start = {
            **self._head(),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(None),
        }
        yield {"type": "message_start", "message": start}

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[Event]:
        if out.reasoning:
            delta = {"type": "thinking_delta", "thinking": out.reasoning}
            yield from self.blocks.delta("thinking", thinking_block(""), delta)
        if out.text:
            delta = {"type": "text_delta", "text": out.text}
            yield from self.blocks.delta("text", {"type": "text", "text": ""}, delta)
        for d in out.call_deltas:  # a call's input streams as it is written
            start = tool_use_block(d.id or "", d.name or "", None)
            piece = {"type": "input_json_delta", "partial_json": d.arguments}
            yield from self.blocks.delta(
                "tool_use", start, piece if d.arguments else None, new=d.id is not None
            )

    def closing(self, result: JobResult) -> Iterable[Event]:
        yield from self.blocks.close()
        usage = self._usage(result)
        yield {
            "type": "message_delta",
            "delta": self._stop(result.choices[0]),
            "usage": {
                "input_tokens": usage["input_tokens"],
                "output_tokens": usage["output_tokens"],
                "cache_read_input_tokens": usage["cache_read_input_tokens"],
            },
        }
        yield {"type": "message_stop"}

    def body(self, result: JobResult) -> Event:
        choice = result.choices[0]
        content = [thinking_block(choice.reasoning)] if choice.reasoning else []
        if choice.text:
            content.append({"type": "text", "text": choice.text})
        content.extend(tool_use_block(c.id, c.name, c.arguments) for c in choice.tool_calls)
        return {
            **self._head(),
            "content": content,
            **self._stop(choice),
            "usage": self._usage(result),
        }

    def heartbeat(self) -> Event:
        return PING
