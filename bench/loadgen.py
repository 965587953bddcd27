"""A load generator for any OpenAI-compatible server: streamed chat completions at fixed concurrency.

Each request streams `/v1/chat/completions` and records when each content chunk arrived, so a
level yields aggregate output tokens/s, time to first token (TTFT) and inter-token latency (ITL)
percentiles, and errors. Shared-prefix mode puts one long system prompt in front of every request
and measures the TTFT of its first (cold) and a repeated (cached) request, one at a time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# Open-ended asks keep a chat model talking until max_tokens (we also send ignore_eos).
_TOPICS = [
    "the history of the printing press",
    "how rivers shape valleys over time",
    "a day in the life of a lighthouse keeper",
    "why the sky changes colour at sunset",
    "the life cycle of a star",
    "how bread is made by hand",
    "the rules and history of chess",
    "a journey on a long-distance train",
]
_FILLER = (
    "The committee reviewed every proposal in detail, compared the costs and benefits of each "
    "option, consulted engineers and residents, and wrote a long report about the findings. "
)  # ~32 tokens in common BPE vocabularies


# Long enough that the grammar stays active for the whole completion.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
                    "kind": {"enum": ["river", "star", "train", "bread"]},
                },
                "required": ["name", "year", "kind"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}


@dataclass
class LoadConfig:
    """One benchmark run against one server."""

    base_url: str
    model: str = ""  # empty: the first model the server lists
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 0  # per level; 0: max(2 * concurrency, 8) (a median of 4 swung ±25%)
    prompt_tokens: int = 64  # approximate length of the user message
    max_tokens: int = 64
    shared_prefix: bool = False
    prefix_tokens: int = 1000
    warmup: int = 2
    timeout: float = 600.0
    api_key: str = ""
    temperature: float = 0.7
    constrained: float = 0.0  # fraction of requests answering under a JSON schema
    # "chat": open-ended asks answered until max_tokens; "repeat": copy a ~300-token text (the
    # answer repeats the prompt: what prompt-lookup speculative decoding is for), until EOS.
    task: str = "chat"
    # Sampled requests carry seed + their index (the same on every server for the same prompt),
    # so two servers' answers can be compared text for text. None: no seed.
    seed: int | None = None

    def is_constrained(self, index: int) -> bool:
        """Request `index` carries a response_format (spread evenly over the run)."""
        return int(index * self.constrained) != int((index - 1) * self.constrained)

    def requests_for(self, concurrency: int) -> int:
        return self.requests or max(2 * concurrency, 8)


@dataclass
class RequestResult:
    """The client's view of one streamed request (seconds since the request was sent)."""

    ok: bool
    ttft: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    latency: float = 0.0
    error: str = ""
    text: str = ""  # the streamed answer
    prompt_tokens: int = 0  # the usage's, when the server reports it

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time after the first (the stream's decode rate)."""
        span = self.latency - self.ttft
        return (self.output_tokens - 1) / span if span > 0 and self.output_tokens > 1 else 0.0

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive content chunks, spread over the tokens they carried."""
        gaps = [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]
        if not gaps:
            return []
        per_gap = max(1.0, (self.output_tokens - 1) / len(gaps))  # tokens a later chunk carried
        return [g / per_gap for g in gaps]


@dataclass
class LevelResult:
    """Aggregates of one concurrency level."""

    concurrency: int
    requests: int
    errors: int
    duration: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    itl_p50: float
    itl_p95: float
    latency_p50: float
    error_sample: str = ""
    prompt_tokens: float = 0.0  # mean of the usage's prompt_tokens (0: not reported)


@dataclass
class BenchResult:
    """Everything one run measured; `to_json()` is what `--json` writes."""

    label: str
    base_url: str
    model: str
    config: dict[str, Any]
    levels: list[LevelResult] = field(default_factory=list)
    prefix_cold_ttft: float | None = None
    prefix_warm_ttft: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks; 0.0 when empty."""
    if not values:
        return 0.0
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    rank = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> LevelResult:
    """Aggregate one level: tokens/s is all output tokens over the level's wall time."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    itls = [g for r in ok for g in r.itls]
    errors = [r for r in results if not r.ok]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(errors),
        duration=duration,
        output_tokens=tokens,
        tokens_per_s=tokens / duration if duration > 0 else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        itl_p50=percentile(itls, 50),
        itl_p95=percentile(itls, 95),
        latency_p50=percentile([r.latency for r in ok], 50),
        error_sample=errors[0].error if errors else "",
        prompt_tokens=sum(r.prompt_tokens for r in ok) / len(ok) if ok else 0.0,
    )


def make_prompt(tokens: int, index: int) -> str:
    """A user message of roughly `tokens` tokens that asks for a long answer."""
    ask = f"Request {index}: write a long, detailed essay about {_TOPICS[index % len(_TOPICS)]}."
    repeats = max(0, round((tokens - 20) / 32))
    context = f" Background: {_FILLER * repeats}" if repeats else ""
    return ask + context


REPEAT_ASK = "Repeat the following text exactly, word for word:\n\n"
REPEAT_TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than two hundred years. Every "
    "night its keeper climbed the narrow stairs, trimmed the wick, polished the great lens and "
    "watched the lamp throw its beam across the dark water. Ships passing along the rocky coast "
    "depended on that light to find their way home. In winter the storms were fierce, and waves "
    "crashed against the rocks below with a sound like thunder. The keeper kept a logbook in "
    "which he wrote down the weather, the ships he saw and anything unusual that happened "
    "during the night. Over the years the logbook filled many shelves in the small room at the "
    "base of the tower. When electric lights were finally installed, the keeper was no longer "
    "needed, and the lighthouse was left empty. Today visitors climb the same stairs, read the "
    "old logbooks and look out over the sea, imagining the long nights the keepers spent alone "
    "with the wind and the light. Some of them stay until sunset, when the beam that no longer "
    "turns still seems to glow for a moment in the last red light of the evening. In the "
    "village below, the old people still tell stories about the keepers: the one who rowed out "
    "alone in a storm to save three fishermen, the one who planted roses in the salty garden, "
    "and the last one, who left a note on the table saying that the sea would always need a "
    "light, even if no one was there to tend it."
)  # ~300 tokens in common BPE vocabularies


def make_prefix(tokens: int, nonce: str) -> str:
    """A long system prompt; the nonce keeps an earlier run's prefix cache from hitting."""
    return f"Session {nonce}. You are a helpful assistant. " + _FILLER * max(1, round(tokens / 32))


class LoadGenerator:
    """Runs a LoadConfig against one server with a shared httpx.AsyncClient."""

    def __init__(
        self, cfg: LoadConfig, client: httpx.AsyncClient | None = None, first_index: int = 0
    ):
        self.cfg = cfg
        self._client = client
        self._counter = first_index  # prompts are numbered from here: a later run repeats none
        self.prefix = make_prefix(cfg.prefix_tokens, uuid.uuid4().hex[:8])

    async def run(self, label: str = "") -> BenchResult:
        """Warm up, then measure the shared prefix (if asked) and every concurrency level."""
        owns = self._client is None
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        limits = httpx.Limits(max_connections=max(self.cfg.concurrency) + 4)
        client = self._client or httpx.AsyncClient(
            base_url=self.cfg.base_url, timeout=self.cfg.timeout, headers=headers, limits=limits
        )
        self._client = client
        try:
            model = self.cfg.model or await self.first_model()
            result = BenchResult(
                label or self.cfg.base_url, self.cfg.base_url, model, asdict(self.cfg)
            )
            for _ in range(self.cfg.warmup):
                await self.one(model, with_prefix=False)
            if self.cfg.shared_prefix:
                cold = await self.one(model, with_prefix=True)
                warm = await self.one(model, with_prefix=True)
                result.prefix_cold_ttft = cold.ttft if cold.ok else None
                result.prefix_warm_ttft = warm.ttft if warm.ok else None
            for c in self.cfg.concurrency:
                result.levels.append(await self.level(model, c))
            return result
        finally:
            if owns:
                await client.aclose()
                self._client = None

    @property
    def sent(self) -> int:
        """The index of the last prompt made (`first_index` + requests sent)."""
        return self._counter

    async def first_model(self) -> str:
        assert self._client is not None
        r = await self._client.get("/v1/models")
        r.raise_for_status()
        data = r.json().get("data") or []
        if not data:
            raise RuntimeError("the server lists no models; pass --model")
        return str(data[0]["id"])

    async def level(self, model: str, concurrency: int) -> LevelResult:
        """`requests_for(concurrency)` requests, at most `concurrency` in flight at once."""
        total = self.cfg.requests_for(concurrency)
        todo = list(range(total))
        results: list[RequestResult] = []

        async def worker() -> None:
            while todo:
                todo.pop()
                results.append(await self.one(model, with_prefix=self.cfg.shared_prefix))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
        return summarize(concurrency, results, time.perf_counter() - start)

    def body(self, model: str, with_prefix: bool) -> dict[str, Any]:
        self._counter += 1
        repeat = self.cfg.task == "repeat"
        ask = (
            REPEAT_ASK + REPEAT_TEXT
            if repeat
            else make_prompt(self.cfg.prompt_tokens, self._counter)
        )
        messages = [{"role": "user", "content": ask}]
        if with_prefix:
            messages.insert(0, {"role": "system", "content": self.prefix})
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            # honoured by servers that know it (ours, vLLM); ignored elsewhere. A copy ends itself.
            "ignore_eos": not repeat,
        }
        if self.cfg.seed is not None:
            body["seed"] = self.cfg.seed + self._counter
        if self.cfg.is_constrained(self._counter):
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "records", "schema": BENCH_SCHEMA},
            }
        return body

    async def one(self, model: str, with_prefix: bool) -> RequestResult:
        """Send one streamed request; never raises (failures become ok=False with a message)."""
        assert self._client is not None
        body = self.body(model, with_prefix)
        start = time.perf_counter()
        try:
            return await stream_chat(self._client, body, start)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            return RequestResult(ok=False, latency=time.perf_counter() - start, error=_short(e))


async def stream_chat(
    client: httpx.AsyncClient, body: dict[str, Any], start: float
) -> RequestResult:
    """Stream one chat completion; tokens are the usage's completion_tokens, else content chunks."""
    chunk_times: list[float] = []
    parts: list[str] = []
    usage_tokens: int | None = None
    prompt_tokens = 0
    error = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")[:200]
            return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {text}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                error = str(event["error"].get("message", event["error"]))[:200]
                continue
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens", usage_tokens)
                prompt_tokens = event["usage"].get("prompt_tokens") or prompt_tokens
            for choice in event.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    chunk_times.append(time.perf_counter() - start)
                    parts.append(content)
    latency = time.perf_counter() - start
    tokens = usage_tokens if usage_tokens is not None else len(chunk_times)
    if error or not chunk_times:
        return RequestResult(ok=False, latency=latency, error=error or "no tokens streamed")
    return RequestResult(
        ok=True,
        ttft=chunk_times[0],
        chunk_times=chunk_times,
        output_tokens=tokens,
        latency=latency,
        text="".join(parts),
        prompt_tokens=prompt_tokens,
    )


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:200]
