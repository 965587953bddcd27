"""SIGTERM during 8 active streams: each completes or ends with an error frame; exit 0 in time.

Starts the real server (`python -m server.cli serve`) with the real default model, from the
session's imported copy (the `smollm2_dir` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DRAIN_TIMEOUT = 10.0  # server/shutdown.py's default
STARTUP_TIMEOUT = 600.0  # the first run imports the default model

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A real `mlxd serve` on a free loopback port."""

    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> None:
        if not (ROOT / "server" / "cli.py").exists():
            pytest.skip("server/cli.py is not there yet")
        env = dict(os.environ, MLXD_HOST="127.0.0.1", MLXD_PORT=str(self.port), **self.env)
        env["PYTHONPATH"] = str(ROOT)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            cmd = [sys.executable, "-m", "server.cli", "serve"]
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"server not ready:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-3000:]

    def first_model(self) -> str:
        return str(httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]["id"])


def start_server(tmp_path: Path, models_dir: Path, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(env={"MLXD_MODELS": str(models_dir), **env})
    try:
        server.start(tmp_path / "server.log")
        yield server
    finally:
        server.stop()


@dataclass
class StreamEnd:
    """How one stream ended: its finish_reason, an error frame's message, [DONE] seen."""

    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False
    status: int = 0
    completion_tokens: int | None = None
    request_id: str = ""
    broken: str = ""  # a transport error: the stream was cut without a proper end


async def stream_chat(
    client: httpx.AsyncClient, model: str, max_tokens: int, end: StreamEnd
) -> None:
    body = {
        "model": model,
        "messages": [
            {"role": "user", "content": "Write a long story about a dragon and a knight."}
        ],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            end.status = r.status_code
            end.request_id = r.headers.get("x-request-id", "")
            if r.status_code != 200:
                await r.aread()
                end.first_token.set()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    end.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    end.error = str(event["error"].get("message", ""))
                    continue
                if event.get("usage"):
                    end.completion_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        end.first_token.set()
                    if choice.get("finish_reason"):
                        end.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as e:
        end.broken = type(e).__name__
    finally:
        end.first_token.set()


@pytest.fixture
def server(tmp_path: Path, smollm2_dir: Path) -> Iterator[ServerProcess]:
    yield from start_server(tmp_path, smollm2_dir.parent)


async def test_sigterm_drains_active_streams_and_exits_zero(server: ServerProcess) -> None:
    model = server.first_model()
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
