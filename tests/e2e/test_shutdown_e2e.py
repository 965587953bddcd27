"""SIGTERM during 8 active streams: each completes or ends with an error frame; exit 0 in time.

Starts the real server (`python -m server.cli serve`) with the real default model, from the
session's imported copy (the `smollm2_dir` fixture).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.launch import ServerProcess
from tests.e2e.streams import StreamEnd, first_model, stream_chat

DRAIN_TIMEOUT = 10.0  # server/shutdown.py's default

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(start_server: Callable[..., ServerProcess], smollm2_dir: Path) -> ServerProcess:
    return start_server(smollm2_dir.parent)


async def test_sigterm_drains_active_streams_and_exits_zero(server: ServerProcess) -> None:
    model = first_model(server.url)
    ends = [StreamEnd() for _ in range(8)]
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
        tasks = [asyncio.create_task(stream_chat(client, model, 512, e)) for e in ends]
        await asyncio.wait_for(asyncio.gather(*(e.first_token.wait() for e in ends)), 300)
        assert all(e.status == 200 for e in ends), [e.status for e in ends]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT + 60)
        # A new request is refused now: the listener is closed, or the engine answers 503.
        try:
            late = await client.get("/health", timeout=5)
            assert late.status_code == 503
        except httpx.HTTPError:
            pass
    code = await asyncio.to_thread(server.proc.wait, DRAIN_TIMEOUT + 30)
    elapsed = time.monotonic() - sent
    log = server.log_tail()
    assert code == 0, log
    assert elapsed < DRAIN_TIMEOUT + 30, log  # generous: the drain, unload and interpreter exit
    for e in ends:
        assert not e.broken, (e, log)
        if e.error is None:  # completed: a finish_reason and [DONE]
            assert e.finish_reason in ("stop", "length") and e.done, e
        else:  # cut by the drain timeout: a proper error frame
            assert "shutting down" in e.error or "abort" in e.error, e
    assert "Traceback" not in log
