"""POST /v1/chat/completions: the request -> a Job (messages -> chat template -> n engine
requests); the job's outputs -> chat.completion JSON or chunks (server/jobs.py runs it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.api import EngineAPI
from engine.types import RequestOutput
from server.chat import ChatRequest, Message, chat_job
from server.errors import API, APIError, read_json, validate
from server.jobs import Choice, Job, JobResult, engine_of, respond, settings_of
from server.openai import tools
from server.openai.envelope import envelope, finish_reason, usage, with_timings
from server.openai.logprobs import chat_logprobs
from server.openai.params import new_id, sampling_params, unsupported
from server.openai.protocol import ChatCompletionRequest, ChatMessage, unsupported_field
from server.settings import Settings

_ROLES = {"developer": "system", "function": "tool"}  # what common chat templates understand


def chat_messages(messages: list[ChatMessage]) -> list[Message]:
    """OpenAI's messages as the internal ones: role and plain-text content."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        if m.function_call is not None:
            raise unsupported(f"messages[{i}].function_call")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = str(part.get("type"))[:32]
                    raise APIError(
                        400,
                        f"content part type '{kind}' is not supported (only 'text')",
                        param=f"messages[{i}].content[{j}]",
                        code="unsupported_content",
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        extra: dict[str, Any] = {}
        if m.tool_calls:
            extra["tool_calls"] = tools.template_tool_calls(i, m)
        if m.tool_call_id:
            extra["tool_call_id"] = m.tool_call_id
        out.append(Message(_ROLES.get(m.role, m.role), content or "", m.name, extra))
    return out


def chat_request(req: ChatCompletionRequest, settings: Settings) -> ChatRequest:
    """The internal chat request of a validated body (Anthropic and Responses map onto the same)."""
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "messages"
    params = sampling_params(req, settings, 0, bool(req.logprobs), req.top_logprobs or 0)
    return ChatRequest(
        id=new_id("chatcmpl"),
        model=req.model,
        messages=chat_messages(req.messages),
        params=params,
        max_tokens=requested,
        n=req.n or 1,
        budget_param=param,
        output=tools.output_spec(req),
    )


async def prepare(
    engine: EngineAPI, settings: Settings, data: dict[str, Any]
) -> tuple[Job, ChatRenderer, bool]:
    """The request as a Job, its renderer, and whether it streams."""
    bad = unsupported_field(data, chat=True)
    if bad:
        raise unsupported(bad)
    req = validate(data, ChatCompletionRequest)
    job = await chat_job(engine, settings, chat_request(req, settings))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return job, ChatRenderer(job, bool(req.logprobs), include_usage), bool(req.stream)


async def create_chat_completion(request: Request) -> Response:
    data = read_json(await request.body())
    job, renderer, stream = await prepare(engine_of(request), settings_of(request), data)
    return await respond(request, job, renderer, stream)


def assistant_message(c: Choice) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": c.text if c.text or not c.tool_calls else None,
        "refusal": None,
    }
    if c.reasoning:  # vLLM's name, and the newer spelling
        msg["reasoning_content"] = msg["reasoning"] = c.reasoning
    if c.tool_calls:
        msg["tool_calls"] = tools.message_tool_calls(c.tool_calls)
    return msg


@dataclass
class ChatRenderer:
    """A job's outputs as chat.completion(.chunk) objects."""

    job: Job
    logprobs: bool
    include_usage: bool
    api: API = "openai"

    def __post_init__(self) -> None:
        # Every chunk of one stream carries the same id, model and `created`.
        self._base = envelope(
            "chat.completion.chunk", self.job.id, self.job.model, self.include_usage
        )

    def _chunk(
        self, i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None
    ) -> dict[str, Any]:
        return {
            **self._base,
            "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }

    def opening(self) -> Iterable[dict[str, Any]]:
        for i in range(len(self.job.requests)):
            yield self._chunk(i, {"role": "assistant", "content": ""})

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[dict[str, Any]]:
        i = choice.index
        if out.reasoning:  # vLLM's name, and the newer spelling
            yield self._chunk(i, {"reasoning_content": out.reasoning, "reasoning": out.reasoning})
        if out.text or out.logprobs:
            lp = chat_logprobs(out.logprobs or []) if self.logprobs else None
            yield self._chunk(i, {"content": out.text}, lp=lp)
        for delta in tools.tool_call_deltas(out.call_deltas):
            yield self._chunk(i, {"tool_calls": [delta]})
        if out.finished:
            last = self._chunk(i, {}, finish_reason(out.finish_reason, bool(choice.tool_calls)))
            yield with_timings(last, [out.metrics])

    def closing(self, result: JobResult) -> Iterable[dict[str, Any]]:
        if self.include_usage:
            yield {**self._base, "choices": [], "usage": usage(result.usage())}

    def body(self, result: JobResult) -> dict[str, Any]:
        body = {
            **envelope("chat.completion", self.job.id, self.job.model),
            "choices": [
                {
                    "index": c.index,
                    "message": assistant_message(c),
                    "logprobs": chat_logprobs(c.logprobs) if self.logprobs else None,
                    "finish_reason": finish_reason(c.finish_reason, bool(c.tool_calls)),
                }
                for c in result.choices
            ],
            "usage": usage(result.usage()),
        }
        return with_timings(body, result.metrics)

    def heartbeat(self) -> None:
        return None
