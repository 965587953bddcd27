"""KV on demand on the real model: streams without max_tokens no longer queue behind whole-context
reservations, and a stream preempted for memory goes on with exactly the text it would have had."""

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.launch import ServerProcess

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
KV_PER_TOKEN = 30 * 3 * 64 * 2 * 4  # SmolLM2-135M: layers * kv heads * head dim * (k, v) * fp32
CONTEXT = 8192
QUESTIONS = [
    "What is two plus two?",
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Say hello in French.",
    "What animal says moo?",
    "How many legs does a cat have?",
]


def kv_server(start: Callable[..., ServerProcess], models: Path, kv_tokens: int) -> ServerProcess:
    limit = 3_000_000_000
    fraction = kv_tokens * KV_PER_TOKEN / limit
    return start(models, MLXD_MEMORY_LIMIT=str(limit), MLXD_KV_FRACTION=f"{fraction:.9f}")


@pytest.fixture
def four_contexts(smollm2_dir: Path, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return kv_server(start_server, smollm2_dir.parent, 4 * CONTEXT)


@pytest.fixture
def tight_kv(smollm2_dir: Path, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return kv_server(start_server, smollm2_dir.parent, 200)  # each stream needs ~140


async def stream(client: httpx.AsyncClient, content: str, **extra) -> tuple[str, str | None]:
    """(text, finish_reason) of one streamed greedy chat; any error fails the test."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0}
    text, reason = "", None
    async with client.stream(
        "POST", "/v1/chat/completions", json={**body, **extra, "stream": True}
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                reason = choice.get("finish_reason") or reason
    return text, reason


def counter(metrics: str, name: str) -> float:
    m = re.search(rf"^{name}(?:_total)? (\S+)$", metrics, flags=re.M)
    assert m, name
    return float(m.group(1))


async def test_24_streams_without_max_tokens_run_together(four_contexts: ServerProcess):
    async with httpx.AsyncClient(base_url=four_contexts.url, timeout=600) as client:
        # No max_tokens (so each may run to the context's end); the first sentence is enough.
        alone = {q: await stream(client, q, stop=["."]) for q in QUESTIONS}
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                text = (await client.get("/metrics")).text
                m = re.search(r"^mlxd_running_sequences (\S+)$", text, flags=re.M)
                peak = max(peak, int(float(m.group(1)))) if m else peak
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        together = await asyncio.gather(*(stream(client, q, stop=["."]) for q in QUESTIONS * 4))
        watcher.cancel()
    assert together == [alone[q] for q in QUESTIONS * 4]
    assert all(reason == "stop" for _, reason in together)
    assert peak > 4  # a whole-context reservation each would have held them to 4 at a time


async def test_preempted_streams_continue_with_the_same_text(tight_kv: ServerProcess):
    prompts = ["Write a long story about a dragon.", "Write a long poem about the sea."]
    async with httpx.AsyncClient(base_url=tight_kv.url, timeout=600) as client:
        alone = {p: await stream(client, p, max_tokens=100) for p in prompts}
        together = await asyncio.gather(*(stream(client, p, max_tokens=100) for p in prompts * 2))
        metrics = (await client.get("/metrics")).text
    assert counter(metrics, "mlxd_engine_preemptions") > 0
    assert together == [alone[p] for p in prompts * 2]
