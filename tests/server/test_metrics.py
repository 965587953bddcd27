"""/metrics exposition, request ids and request logs, against the FakeEngine (no MLX)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import pytest

from engine.errors import QueueFullError
from tests.promtext import sample
from tests.server.asgi import asgi_receiver, asgi_scope
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app


def post(client: httpx.AsyncClient, **body: object):
    """A completion through the real app's job runner (not streamed)."""
    return client.post(
        "/v1/completions", json={"model": FAKE_MODEL, "prompt": "hi", "max_tokens": 64, **body}
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(Script(text="abcdef"))


@pytest.fixture
async def client(engine: FakeEngine):
    app = make_app(engine)
    await engine.start()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def test_every_family_is_exposed(client: httpx.AsyncClient) -> None:
    await post(client)
    text = await scrape(client)
    for family in (
        "mlxd_requests_total",
        "mlxd_request_duration_seconds_bucket",
        "mlxd_time_to_first_token_seconds_bucket",
        "mlxd_inter_token_latency_seconds_bucket",
        "mlxd_prompt_tokens_total",
        "mlxd_cached_prompt_tokens_total",
        "mlxd_generated_tokens_total",
        "mlxd_running_sequences",
        "mlxd_waiting_sequences",
        "mlxd_kv_cache_bytes",
        "mlxd_kv_cache_budget_bytes",
        "mlxd_kv_reserved_bytes",
        "mlxd_prefix_cache_hit_rate",
        "mlxd_prefix_cache_bytes",
        "mlxd_model_weight_bytes",
        "mlxd_mlx_active_bytes",
        "mlxd_mlx_peak_bytes",
        "mlxd_mlx_cache_bytes",
        "mlxd_mlx_cache_limit_bytes",
        "mlxd_process_resident_bytes",
        "mlxd_memory_releases_total",
        "mlxd_model_load_seconds_count",
        "mlxd_engine_up",
    ):
        assert re.search(rf"^{family}(\{{| )", text, re.M), family


async def test_series_move_with_concurrent_streams(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    gate = asyncio.Event()
    engine.script = Script(text="abcdef", gate=gate, cached_tokens=2)
    tasks = [asyncio.create_task(post(client, prompt="xyz")) for _ in range(3)]
    while len(engine.active) < 3:  # the streams are admitted and parked at the gate
        await asyncio.sleep(0)
    assert sample(await scrape(client), "mlxd_running_sequences") == 3
    gate.set()
    responses = await asyncio.gather(*tasks)
    assert [r.json()["choices"][0]["text"] for r in responses] == ["abcdef"] * 3
    text = await scrape(client)
    assert sample(text, "mlxd_running_sequences") == 0
    ok = {"endpoint": "/v1/completions", "model": FAKE_MODEL, "outcome": "stop"}
    assert sample(text, "mlxd_requests_total", **ok) == 3
    assert sample(text, "mlxd_generated_tokens_total", model=FAKE_MODEL) == 18
    assert sample(text, "mlxd_prompt_tokens_total", model=FAKE_MODEL) == 12  # BOS + 3 chars, x3
    assert sample(text, "mlxd_cached_prompt_tokens_total", model=FAKE_MODEL) == 6
    assert sample(text, "mlxd_time_to_first_token_seconds_count", model=FAKE_MODEL) == 3
    assert sample(text, "mlxd_inter_token_latency_seconds_count", model=FAKE_MODEL) == 15
    assert sample(text, "mlxd_model_weight_bytes", model=FAKE_MODEL) == 4_000_000
    # The first get_model loaded the model; later calls found it loaded.
    assert sample(text, "mlxd_model_load_seconds_count", model=FAKE_MODEL) == 1


async def test_queue_full_counts_a_rejection(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = Script(reject=QueueFullError("the queue is full"))
    r = await post(client)
    assert r.status_code == 429
    text = await scrape(client)
    assert sample(text, "mlxd_rejections_total", reason="queue_full") == 1
    rejected = {"endpoint": "/v1/completions", "model": FAKE_MODEL, "outcome": "rejected"}
    assert sample(text, "mlxd_requests_total", **rejected) == 1
    assert sample(text, "mlxd_generated_tokens_total", model=FAKE_MODEL) == 0


async def test_context_rejection_is_counted(client: httpx.AsyncClient) -> None:
    r = await post(client, max_tokens=10_000)
    assert r.status_code == 400
    text = await scrape(client)
    assert sample(text, "mlxd_rejections_total", reason="context") == 1


async def test_leaving_early_counts_an_abort(engine: FakeEngine) -> None:
    engine.script = Script(text="x" * 100, token_delay=0.005)
    app = make_app(engine)
    gone = asyncio.Event()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and b'"text":"x"' in message.get("body", b""):
            gone.set()  # leave after the first token

    body = {"model": FAKE_MODEL, "prompt": "hi", "max_tokens": 64, "stream": True}
    receive = asgi_receiver(json.dumps(body).encode(), gone)
    await asyncio.wait_for(app(asgi_scope("/v1/completions"), receive, send), 5)
    assert engine.aborted == [engine.requests[0].request_id]
    text = app.state.metrics.render().decode()
    aborted = {"endpoint": "/v1/completions", "model": FAKE_MODEL, "outcome": "abort"}
    assert sample(text, "mlxd_requests_total", **aborted) == 1


async def test_request_id_header(client: httpx.AsyncClient) -> None:
    a = await client.get("/metrics")
    b = await client.get("/metrics")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    assert (await client.get("/metrics", headers={"X-Request-Id": "abc-123"})).headers[
        "x-request-id"
    ] == "abc-123"
    bad = await client.get("/metrics", headers={"X-Request-Id": "a b<>" * 100})
    assert bad.headers["x-request-id"].startswith("req-")  # a new one, not the client's


async def test_one_log_line_per_request(client: httpx.AsyncClient) -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("mlxd.access")
    handler = Collect(level=logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        r = await client.post(
            "/v1/completions",
            json={"model": FAKE_MODEL, "prompt": "hi"},
            headers={"X-Request-Id": "log-1"},
        )
        await client.get("/metrics")  # scrapes stay out of the INFO log
    finally:
        logger.removeHandler(handler)
    assert r.status_code == 200
    assert len(lines) == 1
    line = lines[0]
    assert "request_id=log-1" in line
    assert f'model="{FAKE_MODEL}"' in line or f"model={FAKE_MODEL}" in line
    assert "completion_tokens=6" in line and "outcome=stop" in line and "status=200" in line
