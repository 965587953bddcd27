"""POST /v1/completions: raw prompts (text, texts, token ids, lists of token ids), echo, logprobs.

Choice index = prompt index * n + sample index, as OpenAI numbers them. `max_tokens: 0` with
`echo` and `logprobs` scores the prompt without generating (the engine's prompt_logprobs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.api import EngineAPI, ModelHandle
from engine.types import GenerateRequest, RequestOutput, TokenLogprob
from server.chat import choice_params
from server.errors import API, APIError, read_json, validate
from server.jobs import Choice, Job, JobResult, engine_of, respond, settings_of
from server.limits import resolve_max_tokens
from server.openai.envelope import envelope, finish_reason, usage, with_timings
from server.openai.logprobs import completion_logprobs
from server.openai.params import new_id, sampling_params, unsupported
from server.openai.protocol import CompletionRequest, unsupported_field
from server.settings import Settings

MAX_CHOICES = 64  # prompts x n


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo prints


def tokenize_prompts(handle: ModelHandle, prompt: Any) -> list[Prompt]:
    tok = handle.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(Prompt(list(tok.encode(p, add_special_tokens=True)), p))
        elif not p:
            raise APIError(400, f"prompt {i} is an empty token list", param="prompt")
        else:
            out.append(Prompt(list(p), tok.decode(list(p))))
    return out


async def prepare(
    engine: EngineAPI, settings: Settings, data: dict[str, Any]
) -> tuple[Job, CompletionRenderer, bool]:
    """The request as a Job, its renderer, and whether it streams."""
    bad = unsupported_field(data, chat=False)
    if bad:
        raise unsupported(bad)
    req = validate(data, CompletionRequest)
    n = req.n or 1
    handle = await engine.get_model(req.model)
    prompts = tokenize_prompts(handle, req.prompt)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    cid = new_id("cmpl")
    score = bool(req.echo) and req.logprobs is not None
    requests = []
    for p, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            req.max_tokens,
            len(prompt.ids),
            handle.context_length,
            "prompt",
            settings.default_max_tokens,
        )
        params = sampling_params(
            req, settings, max_tokens, req.logprobs is not None, req.logprobs or 0
        )
        for i in range(n):
            index = p * n + i
            rid = f"{cid}-{index}" if len(prompts) * n > 1 else cid
            choice = choice_params(params, i, prompt_logprobs=score)
            requests.append(GenerateRequest(rid, handle.name, prompt.ids, choice))
    job = Job(cid, handle.name, requests, n, load_time=handle.load_time)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    renderer = CompletionRenderer(job, prompts, bool(req.echo), req.logprobs, include_usage)
    return job, renderer, bool(req.stream)


async def create_completion(request: Request) -> Response:
    data = read_json(await request.body())
    job, renderer, stream = await prepare(engine_of(request), settings_of(request), data)
    return await respond(request, job, renderer, stream)


@dataclass
class CompletionRenderer:
    """A job's outputs as text_completion objects (streamed chunks have the same shape)."""

    job: Job
    prompts: list[Prompt]
    echo: bool
    logprobs: int | None
    include_usage: bool
    api: API = "openai"

    def __post_init__(self) -> None:
        self._base = envelope("text_completion", self.job.id, self.job.model, self.include_usage)
        self._echoed: set[int] = set()

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.job.n]

    def _logprobs(
        self, index: int, prompt_lps: list[TokenLogprob] | None, gen: list[TokenLogprob]
    ) -> Any:
        if self.logprobs is None:
            return None
        echo_lps = (prompt_lps or []) if self.echo else []
        lps = completion_logprobs([*echo_lps, *gen])
        if self.echo:
            # The first prompt token has no logprob (nothing precedes it): offsets start after it.
            start = len(self.prompt_of(index).text) - sum(len(t.token) for t in echo_lps)
            lps["text_offset"] = [o + max(start, 0) for o in lps["text_offset"]]
        return lps

    def _chunk(
        self, i: int, text: str, lp: Any = None, finish: str | None = None
    ) -> dict[str, Any]:
        return {
            **self._base,
            "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}],
        }

    def opening(self) -> Iterable[dict[str, Any]]:
        return ()

    def chunks(self, out: RequestOutput, choice: Choice) -> Iterable[dict[str, Any]]:
        i = choice.index
        if self.echo and i not in self._echoed:  # a choice's first chunk echoes its prompt
            self._echoed.add(i)
            yield self._chunk(i, self.prompt_of(i).text, self._logprobs(i, out.prompt_logprobs, []))
        if out.text or out.logprobs:
            lp = completion_logprobs(out.logprobs or []) if self.logprobs is not None else None
            yield self._chunk(i, out.text, lp)
        if out.finished:
            last = self._chunk(i, "", finish=finish_reason(out.finish_reason))
            yield with_timings(last, [out.metrics])

    def closing(self, result: JobResult) -> Iterable[dict[str, Any]]:
        if self.include_usage:
            yield {**self._base, "choices": [], "usage": usage(result.usage())}

    def body(self, result: JobResult) -> dict[str, Any]:
        choices = []
        for c in result.choices:
            text = (self.prompt_of(c.index).text if self.echo else "") + c.text
            choices.append(
                {
                    "index": c.index,
                    "text": text,
                    "logprobs": self._logprobs(c.index, c.prompt_logprobs, c.logprobs),
                    "finish_reason": finish_reason(c.finish_reason),
                }
            )
        body = {
            **envelope("text_completion", self.job.id, self.job.model),
            "choices": choices,
            "usage": usage(result.usage()),
        }
        return with_timings(body, result.metrics)

    def heartbeat(self) -> None:
        return None
