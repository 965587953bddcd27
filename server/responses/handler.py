"""POST /v1/responses: OpenAI's Responses API, a converter onto the internal chat request
(server/chat.py) rendered from the job runner's output stream (stateless: nothing is stored).

One `message` output item with one `output_text` part. Streams name each event (the framing in
server/sse.py numbers them: `sequence_number`); an answer cut by max_output_tokens ends
`incomplete`, as OpenAI's does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.types import FinishReason, RequestOutput
from server.chat import chat_job
from server.errors import API, read_json, validate
from server.jobs import Choice, Job, JobResult, engine_of, respond, settings_of
from server.responses.convert import chat_request
from server.responses.protocol import ResponsesRequest

Event = dict[str, Any]


async def create_response(request: Request) -> Response:
    req = validate(read_json(await request.body()), ResponsesRequest)
    job = await chat_job(engine_of(request), settings_of(request), chat_request(req))
    return await respond(request, job, ResponsesRenderer(req, job), bool(req.stream))


def text_part(text: str) -> Event:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponsesRenderer:
    """A job's output as a Responses `response` object, or its stream of named events."""

    req: ResponsesRequest
    job: Job
    api: API = "responses"
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def _where(self) -> Event:
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def _message(self, text: str | None, status: str) -> Event:
        """The answer's message item; text None: not started (no content part yet)."""
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [text_part(text)],
        }

    def _response(self, result: JobResult | None) -> Event:
        """The response; result None: still in progress (no output, no usage yet)."""
        status, incomplete, output, usage = "in_progress", None, [], None
        if result is not None:
            choice = result.choices[0]
            cut = choice.finish_reason == FinishReason.LENGTH
            status = "incomplete" if cut else "completed"
            incomplete = {"reason": "max_output_tokens"} if cut else None
            output = [self._message(choice.text, status)]
            u = result.usage()
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }
        return {
            "id": self.job.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "model": self.job.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": self.job.requests[0].params.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": self.job.requests[0].params.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": self.req.user,
            "metadata": self.req.metadata or {},
        }

    def opening(self) -> Iterable[Event]:
        yield {"type": "response.created", "response": self._response(None)}
        yield {"type": "response.in_progress", "response": self._response(None)}
        item = self._message(None, "in_progress")
        yield {"type": "response.output_item.added", "output_index": 0, "item": item}
        yield {"type": "response.content_part.added", **self._where(), "part": text_part("")}

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[Event]:
        if out.text:
            delta = {"delta": out.text, "logprobs": []}
            yield {"type": "response.output_text.delta", **self._where(), **delta}

    def closing(self, result: JobResult) -> Iterable[Event]:
        text = result.choices[0].text
        yield {"type": "response.output_text.done", **self._where(), "text": text, "logprobs": []}
        yield {"type": "response.content_part.done", **self._where(), "part": text_part(text)}
        final = self._response(result)
        item = final["output"][0]
        yield {"type": "response.output_item.done", "output_index": 0, "item": item}
        yield {"type": f"response.{final['status']}", "response": final}

    def body(self, result: JobResult) -> Event:
        return self._response(result)

    def heartbeat(self) -> None:
        return None
