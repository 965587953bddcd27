"""The internal chat request every chat API converts to, and the Job it becomes.

OpenAI chat completions and responses, Ollama /api/chat and Anthropic messages map their
bodies onto a ChatRequest; `chat_job` does the rest once for all of them: load the
model, render its chat template, fit the completion budget to the context (server/limits.py)
and make one GenerateRequest per choice. What differs between APIs is a field here, not code.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.api import EngineAPI, ModelHandle
from engine.output.events import OutputSpec
from engine.output.prompting import tool_messages
from engine.types import GenerateRequest, SamplingParams
from server.errors import APIError
from server.jobs import Job
from server.limits import check_context, check_messages, default_budget, resolve_max_tokens
from server.settings import Settings
from server.truncation import fit_messages, fit_prompt

log = logging.getLogger("mlxd.server")


@dataclass
class Message:
    """One chat message as the chat template sees it (plain-text content)."""

    role: str
    content: str
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more template fields, e.g. tool_calls

    def template_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content, **self.extra}
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class ChatRequest:
    """A chat, whatever API it came in by."""

    id: str  # the job's id; choices are "<id>-<i>" when n > 1
    model: str
    messages: list[Message]
    params: SamplingParams  # max_tokens is set by chat_job
    max_tokens: int | None = None  # None: what the context has left
    n: int = 1
    keep_alive: float | None = None  # seconds; None: the model's default
    num_ctx: int | None = None  # a context smaller than the model's (Ollama's num_ctx)
    # A budget past the context: "reject" with 400 (OpenAI), or "clamp" it to fit (Ollama).
    overflow: Literal["reject", "clamp"] = "reject"
    budget_param: str = "max_tokens"  # names the field in a context error
    # A model without a chat template: 400 (False), or continue a plain transcript (True).
    base_model_transcript: bool = False
    # Tools, tool choice, a JSON answer, reasoning (engine/output): the output pipeline's spec.
    output: OutputSpec | None = None
    prefill: str = ""  # the start of the assistant's answer, which the model continues
    # A prompt past the context: drop old messages, then cut tokens (Ollama's `truncate`,
    # server/truncation.py), keeping the first num_keep tokens; else a 400 (OpenAI).
    truncate: bool = False
    num_keep: int = 4


def chat_text(
    tok: Any,
    name: str,
    messages: list[Message],
    transcript: bool,
    output: OutputSpec | None = None,
) -> tuple[str, bool]:
    """The prompt text of a chat, ending with the assistant's turn, and whether the tokenizer
    should add its special tokens (no: a chat template writes them itself). Tools go in as the
    template understands them (engine/output/prompting.py)."""
    if getattr(tok, "chat_template", None) is None:
        if not transcript:
            raise APIError(
                400,
                f"model '{name}' has no chat template; send it a raw prompt instead",
                param="model",
                code="no_chat_template",
            )
        # A base model: a plain transcript is the best it can continue.
        lines = [f"{m.role}: {m.content}" for m in messages]
        return "\n".join(lines) + "\nassistant:", True
    dicts = [m.template_dict() for m in messages]
    extra: dict[str, Any] = {}
    if output is not None:
        dicts, extra = tool_messages(output, tok.chat_template, dicts)
        if not output.reasoning:
            extra["enable_thinking"] = False
        elif output.reasoning_effort is not None:
            extra["reasoning_effort"] = output.reasoning_effort
    try:
        text = tok.apply_chat_template(dicts, add_generation_prompt=True, **extra)
    except Exception as e:  # jinja's raise_exception(): e.g. roles must alternate
        reason = (str(e).splitlines() or ["invalid messages"])[0][:200]
        raise APIError(
            400, f"the model's chat template rejected the messages: {reason}", param="messages"
        ) from None
    return text, False


def render_chat(
    handle: ModelHandle,
    messages: list[Message],
    transcript: bool,
    output: OutputSpec | None = None,
    prefill: str = "",
) -> list[int]:
    """The prompt's token ids (see chat_text), `prefill` appended after the assistant's turn."""
    text, special = chat_text(handle.tokenizer, handle.name, messages, transcript, output)
    return list(handle.tokenizer.encode(text + prefill, add_special_tokens=special))


def chat_prompt(handle: ModelHandle, req: ChatRequest, context: int) -> list[int]:
    """The chat's prompt ids; with `req.truncate`, fitted to leave the answer a token at least."""

    def render(messages: list[Message]) -> list[int]:
        return render_chat(handle, messages, req.base_model_transcript, req.output, req.prefill)

    if not req.truncate:
        return render(req.messages)
    ids, dropped = fit_messages(req.messages, render, context - 1)
    if dropped:
        log.info("[%s] dropped the %d oldest messages to fit the context", req.id, dropped)
    bos = getattr(handle.tokenizer, "bos_token_id", None)
    return fit_prompt(ids, context, req.num_keep, bos, req.id)


def usable_context(handle: ModelHandle, num_ctx: int | None) -> int:
    """The model's context, or a smaller one the request asked for (never a larger one)."""
    if num_ctx is None:
        return handle.context_length
    if num_ctx <= 0:
        raise APIError(400, "num_ctx must be positive", param="num_ctx")
    return min(handle.context_length, num_ctx)


def completion_budget(
    prompt_tokens: int,
    context: int,
    requested: int | None,
    overflow: Literal["reject", "clamp"],
    param: str,
    default: int = 0,
) -> int:
    """max_tokens for a prompt in a context (see ChatRequest.overflow); `default` stands in
    for an absent one (the default_max_tokens setting)."""
    if overflow == "reject":
        return resolve_max_tokens(requested, prompt_tokens, context, param, default)
    check_context(prompt_tokens, 1, context, param)  # not even one token fits
    if requested is None:
        return default_budget(default, prompt_tokens, context)
    return min(requested, context - prompt_tokens)


def choice_params(params: SamplingParams, i: int, **changes: Any) -> SamplingParams:
    """The params of choice i: seeds differ per choice, so n samples differ but reproduce."""
    seed = None if params.seed is None else params.seed + i
    return dataclasses.replace(params, seed=seed, **changes)


def prompt_job(
    job_id: str,
    handle: ModelHandle,
    ids: list[int],
    params: SamplingParams,
    n: int = 1,
    keep_alive: float | None = None,
    output: OutputSpec | None = None,
) -> Job:
    """A Job of n samples of one tokenized prompt."""
    requests = [
        GenerateRequest(
            f"{job_id}-{i}" if n > 1 else job_id,
            handle.name,
            ids,
            choice_params(params, i),
            keep_alive=keep_alive,
            output=output,
        )
        for i in range(n)
    ]
    return Job(job_id, handle.name, requests, load_time=handle.load_time)


async def chat_job(engine: EngineAPI, settings: Settings, req: ChatRequest) -> Job:
    """Load the model, render the chat and fit its budget: the Job the runner executes."""
    check_messages(settings, len(req.messages))
    handle = await engine.get_model(req.model, keep_alive=req.keep_alive)
    context = usable_context(handle, req.num_ctx)
    ids = chat_prompt(handle, req, context)
    max_tokens = completion_budget(
        len(ids),
        context,
        req.max_tokens,
        req.overflow,
        req.budget_param,
        settings.default_max_tokens,
    )
    params = dataclasses.replace(req.params, max_tokens=max_tokens)
    return prompt_job(req.id, handle, ids, params, req.n, req.keep_alive, req.output)
