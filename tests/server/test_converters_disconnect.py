"""A client leaving an Anthropic or Responses request (streamed or not) aborts its engine request."""

from __future__ import annotations

import asyncio
import json

import pytest

import engine  # noqa: F401  (BLAS preload before anything imports mlx)
from tests.server.asgi import asgi_receiver as _receiver
from tests.server.asgi import asgi_scope as _scope
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]
BODIES = {
    "/v1/messages": {"model": FAKE_MODEL, "max_tokens": 200, "messages": USER},
    "/v1/responses": {"model": FAKE_MODEL, "input": "hi"},
}


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_engine_request(path: str, stream: bool) -> None:
    eng = FakeEngine(Script(text="x" * 150, token_delay=0.001))
    app = make_app(eng)
    gone = asyncio.Event()
    body = json.dumps({**BODIES[path], "stream": stream}).encode()
    chunks = 0

    async def send(message: dict) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body":
            chunks += 1
            if chunks == 5:
                gone.set()

    async def disconnect_when_generating() -> None:
        while not eng.active:
            await asyncio.sleep(0)
        gone.set()

    watcher = asyncio.ensure_future(
        disconnect_when_generating() if not stream else asyncio.sleep(0)
    )
    await asyncio.wait_for(app(_scope(path), _receiver(body, gone), send), 5)
    await watcher
    assert len(eng.requests) == 1 and eng.aborted == [eng.requests[0].request_id]
    assert eng.finished == [] and not eng.active
