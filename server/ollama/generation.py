"""/api/chat and /api/generate: each body -> a Job (server/jobs.py runs it) and a renderer for
Ollama's NDJSON fragments and final object. An empty prompt loads or unloads the model instead.

`prepare_*` raise (APIError, engine errors) when the request is rejected; the runner keeps the
status code for failures before the first output and ends the stream with an `{"error": ...}`
line after it. The CLI's in-process mode runs the same jobs (`job_events`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from engine.api import EngineAPI
from engine.output.events import ToolCall
from engine.types import FinishReason, RequestOutput
from server.chat import (
    ChatRequest,
    Message,
    chat_job,
    completion_budget,
    prompt_job,
    usable_context,
)
from server.errors import API, APIError
from server.jobs import Choice, Job, JobResult
from server.limits import stop_list
from server.ollama.options import (
    budget_options,
    final_stats,
    keep_option,
    parse_keep_alive,
    sampling_params,
    timestamp,
)
from server.ollama.prompt import generate_prompt
from server.ollama.schemas import ChatBody, GenerateBody
from server.ollama.structured import ollama_tool_calls, output_spec, template_extra
from server.settings import Settings
from server.truncation import fit_prompt

Event = dict[str, Any]


def check_unsupported(model: str, images: bool = False, suffix: str = "") -> None:
    """Refuse, with Ollama's 400, features this server does not have yet."""
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


async def prepare_chat(
    engine: EngineAPI, settings: Settings, body: ChatBody
) -> tuple[Job, OllamaRenderer] | Event:
    """A Job and its renderer; or, for no messages, the load/unload answer."""
    images = any(m.images for m in body.messages)
    check_unsupported(body.model, images)
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.messages:
        event = await load_or_unload(engine, body.model, keep_alive)
        return {**event, "message": {"role": "assistant", "content": ""}}
    spec = await output_spec(engine, body.model, body.format, body.think, body.tools)
    stop_list(settings, body.options.get("stop"), param="options.stop")
    num_predict, num_ctx = budget_options(body.options)
    started = time.monotonic()
    req = ChatRequest(
        id=f"ollama-{uuid.uuid4().hex}",
        model=body.model,
        messages=[
            Message(m.role, m.content, m.tool_name, template_extra(m)) for m in body.messages
        ],
        params=sampling_params(body.options, 0),
        max_tokens=num_predict,
        keep_alive=keep_alive,
        num_ctx=num_ctx,
        overflow="clamp",
        budget_param="options.num_predict",
        base_model_transcript=True,
        output=spec,
        truncate=body.truncate is not False,
        num_keep=keep_option(body.options),
    )
    job = await chat_job(engine, settings, req)
    job.started = started
    return job, OllamaRenderer(job, body.model, "chat")


async def prepare_generate(
    engine: EngineAPI, settings: Settings, body: GenerateBody
) -> tuple[Job, OllamaRenderer] | Event:
    """A Job and its renderer; or, for an empty prompt, the load/unload answer."""
    check_unsupported(body.model, images=bool(body.images), suffix=body.suffix)
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.prompt and not body.context:
        return {**await load_or_unload(engine, body.model, keep_alive), "response": ""}
    spec = await output_spec(engine, body.model, body.format, body.think, None)
    stop_list(settings, body.options.get("stop"), param="options.stop")
    num_predict, num_ctx = budget_options(body.options)
    started = time.monotonic()
    handle = await engine.get_model(body.model, keep_alive=keep_alive)
    prompt = generate_prompt(
        handle.tokenizer, body.prompt, body.system, body.template, body.raw, spec
    )
    ids = list(body.context or []) if not body.raw else []
    if prompt.text:
        ids += handle.tokenizer.encode(
            prompt.text, add_special_tokens=prompt.add_special_tokens and not ids
        )
    context = usable_context(handle, num_ctx)
    job_id = f"ollama-{uuid.uuid4().hex}"
    if body.truncate is not False:
        bos = getattr(handle.tokenizer, "bos_token_id", None)
        ids = fit_prompt(ids, context, keep_option(body.options), bos, job_id)
    budget = completion_budget(len(ids), context, num_predict, "clamp", "options.num_predict")
    params = sampling_params(body.options, budget)
    job = prompt_job(job_id, handle, ids, params, keep_alive=keep_alive, output=spec)
    job.started = started
    return job, OllamaRenderer(job, body.model, "generate", context=not body.raw)


@dataclass
class OllamaRenderer:
    """A job's outputs as /api/chat `message` or /api/generate `response` objects."""

    job: Job
    model: str  # as the client named it
    kind: Literal["chat", "generate"]
    context: bool = False  # generate: the final object carries `context` (not in raw mode)
    api: API = "ollama"

    def _fragment(
        self, text: str, done: bool, thinking: str = "", calls: list[ToolCall] | None = None
    ) -> Event:
        head: Event = {"model": self.model, "created_at": timestamp()}
        if self.kind == "chat":
            message: Event = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = ollama_tool_calls(calls)
            return {**head, "message": message, "done": done}
        event = {**head, "response": text, "done": done}
        if thinking:
            event["thinking"] = thinking
        return event

    def _final(
        self, choice: Choice, text: str, thinking: str = "", calls: list[ToolCall] | None = None
    ) -> Event:
        reason = choice.finish_reason
        stats = final_stats(choice.metrics, time.monotonic() - self.job.started, self.job.load_time)
        event = self._fragment(text, True, thinking, calls)
        event["done_reason"] = reason.value if isinstance(reason, FinishReason) else "stop"
        event.update(stats)
        if self.context:
            event["context"] = self.job.requests[0].prompt_token_ids + choice.token_ids
        return event

    def opening(self) -> Iterable[Event]:
        return ()

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[Event]:
        if out.text or out.reasoning or out.tool_calls:
            yield self._fragment(out.text, False, out.reasoning, out.tool_calls)
        if out.finished:
            yield self._final(choice, "")

    def closing(self, result: JobResult) -> Iterable[Event]:
        return ()

    def body(self, result: JobResult) -> Event:
        choice = result.choices[0]
        return self._final(choice, choice.text, choice.reasoning, choice.tool_calls)

    def heartbeat(self) -> Event:
        # An empty fragment: Ollama's clients parse every line, so keep-alives must be valid ones.
        return self._fragment("", False)
