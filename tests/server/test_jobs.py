"""The one job runner, as every API sees it: disconnects abort, keep-alives flow while the first
output is late, rejections keep their status, errors and refusals keep each API's shape."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from engine.errors import QueueFullError
from tests.server.asgi import asgi_receiver, asgi_scope
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]
JOBS = {
    "/api/chat": {"model": FAKE_MODEL, "messages": USER},
    "/api/generate": {"model": FAKE_MODEL, "prompt": "hi"},
    "/v1/chat/completions": {"model": FAKE_MODEL, "messages": USER},
    "/v1/completions": {"model": FAKE_MODEL, "prompt": "hi"},
}


@pytest.mark.parametrize("path", list(JOBS))
async def test_non_streamed_request_of_a_gone_client_is_aborted(path: str) -> None:
    """The client leaves while its answer is generating: the engine request is aborted (its
    row freed) instead of running to the end, and nothing is sent."""
    eng = FakeEngine(Script(text="x" * 200, token_delay=0.005))
    app = make_app(eng)
    gone = asyncio.Event()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def leave_when_generating() -> None:
        while not eng.active:
            await asyncio.sleep(0.001)
        gone.set()

    body = json.dumps({**JOBS[path], "stream": False}).encode()
    watcher = asyncio.ensure_future(leave_when_generating())
    await asyncio.wait_for(app(asgi_scope(path), asgi_receiver(body, gone), send), 5)
    await watcher
    assert len(eng.requests) == 1
    assert eng.aborted == [eng.requests[0].request_id] and eng.finished == []
    assert not eng.active
    assert not any(m.get("body") for m in sent if m["type"] == "http.response.body")


async def test_ollama_stream_sends_heartbeats_while_the_first_token_is_late() -> None:
    """Past the keep-alive interval the headers go out and empty fragments (valid lines for
    Ollama's clients, which json-parse every line) keep the connection alive."""
    gate = asyncio.Event()
    eng = FakeEngine(Script(text="Hi", gate=gate))
    app = make_app(eng, keepalive=0.02)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            gate.set()

    body = json.dumps({**JOBS["/api/chat"], "stream": True}).encode()
    await asyncio.wait_for(app(asgi_scope("/api/chat"), asgi_receiver(body), send), 5)
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    lines = [json.loads(line) for line in text.decode().splitlines()]
    assert lines[0]["message"]["content"] == "" and lines[0]["done"] is False
    assert "".join(line["message"]["content"] for line in lines) == "Hi"
    assert lines[-1]["done"] is True


@pytest.mark.parametrize("path", list(JOBS))
@pytest.mark.parametrize("stream", [False, True])
def test_rejection_keeps_its_status_in_each_shape(path: str, stream: bool) -> None:
    eng = FakeEngine(Script(reject=QueueFullError("queue full")))
    with TestClient(make_app(eng)) as c:
        r = c.post(path, json={**JOBS[path], "stream": stream})
    assert r.status_code == 429 and r.headers["retry-after"]
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert err == "queue full"
    else:
        assert err["message"] == "queue full" and err["code"] == "queue_full"


@pytest.mark.parametrize(
    ("path", "method"), [("/api/tags", "GET"), ("/v1/models", "GET"), ("/metrics", "GET")]
)
def test_foreign_host_is_refused_in_the_shape_of_the_api(path: str, method: str) -> None:
    with TestClient(make_app(FakeEngine(), host="127.0.0.1")) as c:
        r = c.request(method, path, headers={"Host": "evil.example.com"})
    assert r.status_code == 403
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and "local hosts" in err
    else:
        assert err["type"] == "permission_error" and err["code"] == "host_not_allowed"


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_message_and_stop_limits_come_from_the_settings(path: str) -> None:
    with TestClient(make_app(FakeEngine(), max_messages=2, max_stop_strings=1)) as c:
        many = [{"role": "user", "content": "a"}] * 3
        r = c.post(path, json={"model": FAKE_MODEL, "messages": many, "stream": False})
        assert r.status_code == 400 and "at most 2 messages" in json.dumps(r.json())
        stops = ["a", "b"]
        extra = {"options": {"stop": stops}} if path.startswith("/api/") else {"stop": stops}
        r = c.post(path, json={**JOBS[path], "stream": False, **extra})
        assert r.status_code == 400 and "at most 1 stop strings" in json.dumps(r.json())
