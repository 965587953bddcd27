"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, a converter onto
the internal chat request (server/chat.py) rendered from the job runner's output stream.

Usage: `input_tokens` is the whole prompt (what count_tokens reports for the same request);
`cache_read_input_tokens` says how many of them the prefix cache served.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.types import FinishReason, RequestOutput
from server.anthropic.convert import chat_request, template_messages
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
    messages, prefill = template_messages(req)
    check_messages(settings_of(request), len(messages))
    handle = await engine_of(request).get_model(req.model)
    return JSONResponse(
        {"input_tokens": len(render_chat(handle, messages, False, prefill=prefill))}
    )


@dataclass
class MessagesRenderer:
    """A job's output as an Anthropic message, or as its stream of named events."""

    job: Job
    api: API = "anthropic"

    def _head(self) -> Event:
        return {"id": self.job.id, "type": "message", "role": "assistant", "model": self.job.model}

    def _stop(self, choice: Choice) -> Event:
        matched = choice.stop_matched
        stops = self.job.requests[0].params.stop
        stop = matched if isinstance(matched, str) and matched in stops else None
        if choice.finish_reason == FinishReason.LENGTH:
            reason = "max_tokens"
        else:
            reason = "stop_sequence" if stop is not None else "end_turn"
        return {"stop_reason": reason, "stop_sequence": stop}

    def _usage(self, result: JobResult | None) -> Event:
        usage = result.usage() if result is not None else None
        return {
            "input_tokens": len(self.job.requests[0].prompt_token_ids),
            "output_tokens": usage.completion_tokens if usage else 0,
            "cache_read_input_tokens": usage.cached_tokens if usage else 0,
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
        block = {"type": "text", "text": ""}
        yield {"type": "content_block_start", "index": 0, "content_block": block}

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[Event]:
        if out.text:
            delta = {"type": "text_delta", "text": out.text}
            yield {"type": "content_block_delta", "index": 0, "delta": delta}

    def closing(self, result: JobResult) -> Iterable[Event]:
        usage = self._usage(result)
        yield {"type": "content_block_stop", "index": 0}
        yield {
            "type": "message_delta",
            "delta": self._stop(result.choices[0]),
            "usage": {
                "output_tokens": usage["output_tokens"],
                "cache_read_input_tokens": usage["cache_read_input_tokens"],
            },
        }
        yield {"type": "message_stop"}

    def body(self, result: JobResult) -> Event:
        choice = result.choices[0]
        content = [{"type": "text", "text": choice.text}] if choice.text else []
        return {
            **self._head(),
            "content": content,
            **self._stop(choice),
            "usage": self._usage(result),
        }

    def heartbeat(self) -> Event:
        return PING
