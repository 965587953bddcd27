"""POST /v1/chat/completions: messages -> chat template -> n engine requests -> JSON or SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.api import ModelHandle
from engine.types import GenerateRequest, RequestMetrics, RequestOutput
from server.errors import APIError, from_exception, read_json, validate
from server.openai import common
from server.openai.logprobs import chat_logprobs
from server.openai.protocol import ChatCompletionRequest, ChatMessage, unsupported_field
from server.sse import sse_response, sse_stream

_ROLES = {"developer": "system", "function": "tool"}  # what common chat templates understand


def unsupported(param: str) -> APIError:
    return APIError(
        400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter"
    )


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: role and plain-text content."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.tool_calls:
            raise unsupported(f"messages[{i}].tool_calls")
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
        msg: dict[str, Any] = {"role": _ROLES.get(m.role, m.role), "content": content or ""}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def render_prompt(handle: ModelHandle, messages: list[dict[str, Any]]) -> list[int]:
    tok = handle.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise APIError(
            400,
            f"model '{handle.name}' has no chat template; use /v1/completions with a raw prompt",
            param="model",
            code="no_chat_template",
        )
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # jinja's raise_exception(): e.g. roles must alternate
        reason = (str(e).splitlines() or ["invalid messages"])[0][:200]
        raise APIError(
            400, f"the model's chat template rejected the messages: {reason}", param="messages"
        ) from None
    return list(tok.encode(prompt, add_special_tokens=False))


@dataclass
class ChatJob:
    """A validated chat request, ready to run."""

    id: str
    model: str
    prompt_len: int
    requests: list[GenerateRequest]
    logprobs: bool
    include_usage: bool


async def prepare(request: Request) -> tuple[ChatJob, bool]:
    engine, settings = common.engine_of(request), common.settings_of(request)
    data = read_json(await request.body())
    bad = unsupported_field(data, chat=True)
    if bad:
        raise unsupported(bad)
    req = validate(data, ChatCompletionRequest)
    if len(req.messages) > settings.max_messages:
        raise APIError(
            400, f"at most {settings.max_messages} messages are allowed", param="messages"
        )
    messages = template_messages(req.messages)
    handle = await engine.get_model(req.model)
    ids = render_prompt(handle, messages)
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "messages"
    max_tokens = common.resolve_max_tokens(requested, len(ids), handle.context_length, param)
    params = common.sampling_params(
        req, settings, max_tokens, bool(req.logprobs), req.top_logprobs or 0
    )
    cid, n = common.new_id("chatcmpl"), req.n or 1
    requests = [
        GenerateRequest(
            f"{cid}-{i}" if n > 1 else cid, handle.name, ids, common.with_seed(params, i)
        )
        for i in range(n)
    ]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    job = ChatJob(cid, handle.name, len(ids), requests, bool(req.logprobs), include_usage)
    return job, bool(req.stream)


async def create_chat_completion(request: Request) -> Response:
    job, stream = await prepare(request)
    engine = common.engine_of(request)
    if stream:
        outputs = await common.prime(
            common.outputs(engine, job.requests), request.app.state.keepalive_seconds
        )
        events = chat_events(job, outputs)
        body = sse_stream(
            events, lambda e: from_exception(e).openai_body(), request.app.state.keepalive_seconds
        )
        return sse_response(body)
    try:
        results = await common.unless_disconnected(request, common.collect(engine, job.requests))
    except common.ClientGone:
        return Response(status_code=499)
    return JSONResponse(chat_body(job, results))


def chat_body(job: ChatJob, results: list[common.ChoiceResult]) -> dict[str, Any]:
    metrics = [r.metrics for r in results]
    body = {
        **common.envelope("chat.completion", job.id, job.model),
        "choices": [
            {
                "index": r.index,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": chat_logprobs(r.logprobs) if job.logprobs else None,
                "finish_reason": common.finish_reason(r.finish_reason),
            }
            for r in results
        ],
        "usage": job_usage(job, metrics, [len(r.token_ids) for r in results]),
    }
    return common.with_timings(body, metrics)


def job_usage(
    job: ChatJob, metrics: list[RequestMetrics | None], counted: list[int]
) -> dict[str, Any]:
    completion = sum(m.completion_tokens if m else c for m, c in zip(metrics, counted, strict=True))
    cached = max((m.cached_tokens for m in metrics if m), default=0)
    return common.usage(job.prompt_len, cached, completion)


async def chat_events(
    job: ChatJob, outputs: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed chat completion (sse.py frames them)."""
    base = common.envelope("chat.completion.chunk", job.id, job.model, job.include_usage)

    def chunk(
        i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None
    ) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }

    n = len(job.requests)
    metrics: list[RequestMetrics | None] = [None] * n
    counted = [0] * n
    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, out in outputs:
        common.raise_if_failed(out)
        counted[i] += len(out.token_ids)
        if out.text or out.logprobs:
            lp = chat_logprobs(out.logprobs or []) if job.logprobs else None
            yield chunk(i, {"content": out.text}, lp=lp)
        if out.finished:
            metrics[i] = out.metrics
            yield common.with_timings(
                chunk(i, {}, common.finish_reason(out.finish_reason)), [out.metrics]
            )
    if job.include_usage:
        yield {**base, "choices": [], "usage": job_usage(job, metrics, counted)}
