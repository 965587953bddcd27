"""Scrape /metrics from the real server during concurrent streams; check the series move right.

Two sequences may run and one may wait, so of 6 concurrent streams some are refused (429) and
each refusal must show as a queue-full rejection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.launch import ServerProcess
from tests.e2e.streams import StreamEnd, first_model, stream_chat
from tests.promtext import sample

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], smollm2_dir: Path) -> ServerProcess:
    return start_server(smollm2_dir.parent, MLXD_MAX_NUM_SEQS="2", MLXD_MAX_WAITING="1")


async def test_series_move_under_concurrent_streams(server: ServerProcess) -> None:
    model = first_model(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=120.0) as client:
        before = (await client.get("/metrics")).text
        ends = [StreamEnd() for _ in range(6)]
        tasks = [asyncio.create_task(stream_chat(client, model, 48, e)) for e in ends]
        running_seen: list[float] = []
        kv_seen: list[float] = []
        while not all(t.done() for t in tasks):  # scrape while the streams run
            text = (await client.get("/metrics")).text
            running_seen.append(sample(text, "mlxd_running_sequences"))
            kv_seen.append(sample(text, "mlxd_kv_cache_bytes"))
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks)
        # The stats are a snapshot between engine steps, refreshed at least every idle tick
        # (engine/engine_thread.py): the gauges settle within a few seconds, not at once.
        for _ in range(50):
            after = (await client.get("/metrics")).text
            if sample(after, "mlxd_kv_cache_bytes") == 0:
                break
            await asyncio.sleep(0.1)

    ok = [e for e in ends if e.status == 200]
    refused = [e for e in ends if e.status == 429]
    assert len(ok) + len(refused) == 6, [e.status for e in ends]
    assert refused, "expected a forced queue-full"
    assert all(e.finish_reason in ("stop", "length") and e.done for e in ok)
    assert all(e.request_id for e in ends)

    assert max(running_seen) >= 1 and max(running_seen) <= 2
    assert max(kv_seen) > 0
    assert sample(after, "mlxd_running_sequences") == 0
    assert sample(after, "mlxd_waiting_sequences") == 0
    assert sample(after, "mlxd_kv_cache_bytes") == 0

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("mlxd_rejections_total", reason="queue_full") == len(refused)
    endpoint = {"endpoint": "/v1/chat/completions", "model": model}
    assert delta("mlxd_requests_total", outcome="rejected", **endpoint) == len(refused)
    finished = delta("mlxd_requests_total", outcome="stop", **endpoint) + delta(
        "mlxd_requests_total", outcome="length", **endpoint
    )
    assert finished == len(ok)
    generated = sum(e.completion_tokens or 0 for e in ok)
    assert delta("mlxd_generated_tokens_total", model=model) == generated
    assert delta("mlxd_time_to_first_token_seconds_count", model=model) == len(ok)
    assert delta("mlxd_inter_token_latency_seconds_count", model=model) > 0
    assert sample(after, "mlxd_model_weight_bytes", model=model) > 0
    assert sample(after, "mlxd_mlx_active_bytes") > 0
