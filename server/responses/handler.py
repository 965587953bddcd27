"""POST /v1/responses: OpenAI's Responses API, a converter onto the internal chat request
(server/chat.py) rendered from the job runner's output stream (stateless: nothing is stored).

Output items in answer order: `reasoning` (the model's thinking), `message` (one `output_text`
part), then one `function_call` per call. Streams name each event (the framing in server/sse.py
numbers them: `sequence_number`); an answer cut by max_output_tokens ends `incomplete`, as
OpenAI's does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.output.events import ToolCallDelta
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


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def status_of(choice: Choice) -> str:
    return "incomplete" if choice.finish_reason == FinishReason.LENGTH else "completed"


def text_part(text: str) -> Event:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str) -> Event:
    """The answer's message item; text None: just opened (no content part yet)."""
    content = [] if text is None else [text_part(text)]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def reasoning_item(item_id: str, text: str | None, status: str) -> Event:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def call_item(call_id: str, name: str, arguments: str, status: str) -> Event:
    return {
        "type": "function_call",
        "id": f"fc_{call_id.removeprefix('call_')}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


@dataclass
class _Items:
    """The stream's output items: one open at a time; `done` holds the finished ones."""

    done: list[Event] = field(default_factory=list)
    kind: str | None = None
    id: str = ""
    text: str = ""  # the open item's text so far (a function call's: its arguments)
    fn: tuple[str, str] = ("", "")  # an open function call's call_id and name

    def _where(self) -> Event:
        return {"item_id": self.id, "output_index": len(self.done), "content_index": 0}

    def open(self, kind: str) -> Iterator[Event]:
        yield from self.close()
        self.kind, self.text = kind, ""
        if kind == "reasoning":
            self.id = new_id("rs")
            item = reasoning_item(self.id, None, "in_progress")
        else:
            self.id = new_id("msg")
            item = message_item(self.id, None, "in_progress")
        yield {"type": "response.output_item.added", "output_index": len(self.done), "item": item}
        if kind == "message":
            yield {"type": "response.content_part.added", **self._where(), "part": text_part("")}

    def close(self, status: str = "completed") -> Iterator[Event]:
        where = self._where()
        if self.kind == "function_call":  # open at the end: cut short, it never completed
            item = call_item(*self.fn, self.text, "incomplete")
        elif self.kind == "reasoning":
            yield {"type": "response.reasoning_text.done", **where, "text": self.text}
            item = reasoning_item(self.id, self.text, "completed")
        elif self.kind == "message":
            yield {"type": "response.output_text.done", **where, "text": self.text, "logprobs": []}
            yield {"type": "response.content_part.done", **where, "part": text_part(self.text)}
            item = message_item(self.id, self.text, status)
        else:
            return
        yield {"type": "response.output_item.done", "output_index": len(self.done), "item": item}
        self.done.append(item)
        self.kind = None

    def add(self, out: RequestOutput) -> Iterator[Event]:
        if out.reasoning:
            if self.kind != "reasoning":
                yield from self.open("reasoning")
            self.text += out.reasoning
            yield {"type": "response.reasoning_text.delta", **self._where(), "delta": out.reasoning}
        if out.text:
            if self.kind != "message":
                yield from self.open("message")
            self.text += out.text
            delta = {"delta": out.text, "logprobs": []}
            yield {"type": "response.output_text.delta", **self._where(), **delta}
        for d in out.call_deltas:
            yield from self.call(d)

    def call(self, d: ToolCallDelta) -> Iterator[Event]:
        """A function call's item, opened by its first piece; its arguments stream as deltas."""
        index = len(self.done)
        if d.id is not None:
            yield from self.close()
            index, self.kind, self.text = len(self.done), "function_call", ""
            self.fn = (d.id, d.name or "")
            item = call_item(*self.fn, "", "in_progress")
            self.id = item["id"]
            yield {"type": "response.output_item.added", "output_index": index, "item": item}
        where = {"item_id": self.id, "output_index": index}
        if d.arguments:
            self.text += d.arguments
            yield {"type": "response.function_call_arguments.delta", **where, "delta": d.arguments}
        if d.done:
            args = {"name": self.fn[1], "arguments": self.text}
            yield {"type": "response.function_call_arguments.done", **where, **args}
            done = call_item(*self.fn, self.text, "completed")
            yield {"type": "response.output_item.done", "output_index": index, "item": done}
            self.done.append(done)
            self.kind = None


@dataclass
class ResponsesRenderer:
    """A job's output as a Responses `response` object, or as its stream of named events."""

    req: ResponsesRequest
    job: Job
    api: API = "responses"
    created_at: int = field(default_factory=lambda: int(time.time()))
    items: _Items = field(default_factory=_Items)

    def _response(self, result: JobResult | None, output: list[Event]) -> Event:
        """The response; result None: still in progress (no usage yet)."""
        status, incomplete, usage = "in_progress", None, None
        if result is not None:
            status = status_of(result.choices[0])
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            u = result.usage()
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.total_tokens,
            }
        request = self.job.requests[0]
        spec = request.output
        fmt: Event = {"type": "text"}
        if spec is not None and spec.json_schema is not None:
            fmt = {
                "type": "json_schema",
                "name": "answer",
                "schema": spec.json_schema,
                "strict": spec.strict_schema,
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
            "parallel_tool_calls": spec.parallel_tool_calls if spec is not None else True,
            "previous_response_id": None,
            "reasoning": {"effort": (self.req.reasoning or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": request.params.temperature,
            "text": {"format": fmt},
            "tool_choice": self.req.tool_choice or "auto",
            "tools": self.req.tools or [],
            "top_p": request.params.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": self.req.user,
            "metadata": self.req.metadata or {},
        }

    def opening(self) -> Iterable[Event]:
        yield {"type": "response.created", "response": self._response(None, [])}
        yield {"type": "response.in_progress", "response": self._response(None, [])}

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[Event]:
        yield from self.items.add(out)

    def closing(self, result: JobResult) -> Iterable[Event]:
        if not self.items.done and self.items.kind is None:  # an empty answer has its message
            yield from self.items.open("message")
        yield from self.items.close(status_of(result.choices[0]))
        final = self._response(result, self.items.done)
        yield {"type": f"response.{final['status']}", "response": final}

    def body(self, result: JobResult) -> Event:
        choice = result.choices[0]
        output = (
            [reasoning_item(new_id("rs"), choice.reasoning, "completed")]
            if choice.reasoning
            else []
        )
        if choice.text or not choice.tool_calls:
            output.append(message_item(new_id("msg"), choice.text, status_of(choice)))
        output.extend(call_item(c.id, c.name, c.arguments, "completed") for c in choice.tool_calls)
        return self._response(result, output)

    def heartbeat(self) -> None:
        return None
