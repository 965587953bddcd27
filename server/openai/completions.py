"""POST /v1/completions: raw prompts (text, texts, token ids, lists of token ids), echo, logprobs.

Choice index = prompt index * n + sample index, as OpenAI numbers them. `max_tokens: 0` with
`echo` and `logprobs` scores the prompt without generating (the engine's prompt_logprobs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.api import ModelHandle
from engine.types import GenerateRequest, RequestMetrics, RequestOutput, TokenLogprob
from server.errors import APIError, from_exception, read_json, validate
from server.openai import common
from server.openai.chat import unsupported
from server.openai.logprobs import completion_logprobs
from server.openai.protocol import CompletionRequest, unsupported_field
from server.sse import sse_response, sse_stream

MAX_CHOICES = 64  # prompts x n


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo prints


@dataclass
class CompletionJob:
    id: str
    model: str
    prompts: list[Prompt]
    n: int
    requests: list[GenerateRequest]
    echo: bool
    logprobs: int | None
    include_usage: bool

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.n]


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


async def prepare(request: Request) -> tuple[CompletionJob, bool]:
    engine, settings = common.engine_of(request), common.settings_of(request)
    data = read_json(await request.body())
    bad = unsupported_field(data, chat=False)
    if bad:
        raise unsupported(bad)
    req = validate(data, CompletionRequest)
    n = req.n or 1
    handle = await engine.get_model(req.model)
    prompts = tokenize_prompts(handle, req.prompt)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    cid = common.new_id("cmpl")
    score = bool(req.echo) and req.logprobs is not None
    requests = []
    for p, prompt in enumerate(prompts):
        max_tokens = common.resolve_max_tokens(
            req.max_tokens, len(prompt.ids), handle.context_length, "prompt"
        )
        params = common.sampling_params(
            req, settings, max_tokens, req.logprobs is not None, req.logprobs or 0
        )
        for i in range(n):
            index = p * n + i
            rid = f"{cid}-{index}" if len(prompts) * n > 1 else cid
            choice_params = common.with_seed(params, i, prompt_logprobs=score)
            requests.append(GenerateRequest(rid, handle.name, prompt.ids, choice_params))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    job = CompletionJob(
        cid, handle.name, prompts, n, requests, bool(req.echo), req.logprobs, include_usage
    )
    return job, bool(req.stream)


async def create_completion(request: Request) -> Response:
    job, stream = await prepare(request)
    engine = common.engine_of(request)
    keepalive = request.app.state.keepalive_seconds
    if stream:
        outputs = await common.prime(common.outputs(engine, job.requests), keepalive)
        body = sse_stream(
            completion_events(job, outputs), lambda e: from_exception(e).openai_body(), keepalive
        )
        return sse_response(body)
    try:
        results = await common.unless_disconnected(request, common.collect(engine, job.requests))
    except common.ClientGone:
        return Response(status_code=499)
    return JSONResponse(completion_body(job, results))


def _logprobs(
    job: CompletionJob, index: int, prompt_lps: list[TokenLogprob] | None, gen: list[TokenLogprob]
) -> Any:
    if job.logprobs is None:
        return None
    echo_lps = (prompt_lps or []) if job.echo else []
    lps = completion_logprobs([*echo_lps, *gen])
    if job.echo:
        # The first prompt token has no logprob (nothing precedes it): offsets start after it.
        start = len(job.prompt_of(index).text) - sum(len(t.token) for t in echo_lps)
        lps["text_offset"] = [o + max(start, 0) for o in lps["text_offset"]]
    return lps


def completion_body(job: CompletionJob, results: list[common.ChoiceResult]) -> dict[str, Any]:
    choices = []
    for r in results:
        text = (job.prompt_of(r.index).text if job.echo else "") + r.text
        choices.append(
            {
                "index": r.index,
                "text": text,
                "logprobs": _logprobs(job, r.index, r.prompt_logprobs, r.logprobs),
                "finish_reason": common.finish_reason(r.finish_reason),
            }
        )
    metrics = [r.metrics for r in results]
    body = {
        **common.envelope("text_completion", job.id, job.model),
        "choices": choices,
        "usage": job_usage(job, metrics, [len(r.token_ids) for r in results]),
    }
    return common.with_timings(body, metrics)


def job_usage(
    job: CompletionJob, metrics: list[RequestMetrics | None], counted: list[int]
) -> dict[str, Any]:
    completion = sum(m.completion_tokens if m else c for m, c in zip(metrics, counted, strict=True))
    prompt = sum(len(p.ids) for p in job.prompts)
    # One sample per prompt tells how much of that prompt came from the prefix cache.
    cached = sum(m.cached_tokens for m in metrics[:: job.n] if m)
    return common.usage(prompt, cached, completion)


async def completion_events(
    job: CompletionJob, outputs: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed completion (same object shape as the non-streamed one)."""
    base = common.envelope("text_completion", job.id, job.model, job.include_usage)

    def chunk(i: int, text: str, lp: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}],
        }

    count = len(job.requests)
    metrics: list[RequestMetrics | None] = [None] * count
    counted = [0] * count
    echoed = [not job.echo] * count
    async for i, out in outputs:
        common.raise_if_failed(out)
        counted[i] += len(out.token_ids)
        if not echoed[i]:
            echoed[i] = True
            yield chunk(i, job.prompt_of(i).text, _logprobs(job, i, out.prompt_logprobs, []))
        if out.text or out.logprobs:
            lp = completion_logprobs(out.logprobs or []) if job.logprobs is not None else None
            yield chunk(i, out.text, lp)
        if out.finished:
            metrics[i] = out.metrics
            finish = common.finish_reason(out.finish_reason)
            yield common.with_timings(chunk(i, "", finish=finish), [out.metrics])
    if job.include_usage:
        yield {**base, "choices": [], "usage": job_usage(job, metrics, counted)}
