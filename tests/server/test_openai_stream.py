"""SSE framing, usage chunk, keep-alive, in-band errors, and client disconnects aborting requests."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from tests.server.asgi import asgi_receiver, asgi_scope
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]


def frames(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


def events(text: str) -> list[dict]:
    fs = frames(text)
    assert fs[-1] == "data: [DONE]" and all(f.startswith(("data: ", ": ")) for f in fs)
    return [json.loads(f[6:]) for f in fs[:-1] if f.startswith("data: ")]


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


def post(app, path: str, body: dict) -> str:
    with TestClient(app) as c:
        r = c.post(path, json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return r.text


def test_chat_stream_framing(eng: FakeEngine) -> None:
    body = {
        "model": FAKE_MODEL,
        "messages": USER,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    evs = events(post(make_app(eng), "/v1/chat/completions", body))
    assert len({e["id"] for e in evs}) == 1
    for i in range(2):
        mine = [e["choices"][0] for e in evs if e["choices"] and e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello world"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
    assert all(e["usage"] is None for e in evs[:-1])
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 22


def test_no_usage_chunk_unless_asked(eng: FakeEngine) -> None:
    evs = events(
        post(
            make_app(eng),
            "/v1/chat/completions",
            {"model": FAKE_MODEL, "messages": USER, "stream": True},
        )
    )
    assert all(e["choices"] for e in evs) and all("usage" not in e for e in evs)


def test_stream_equals_non_stream_and_stop_split_across_tokens(eng: FakeEngine) -> None:
    body = {"model": FAKE_MODEL, "messages": USER, "temperature": 0, "stop": ["o w"]}
    with TestClient(make_app(eng)) as c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        evs = events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in evs)
    assert streamed == whole == "Hell"


def test_completions_stream_with_echo(eng: FakeEngine) -> None:
    body = {
        "model": FAKE_MODEL,
        "prompt": "ab",
        "stream": True,
        "echo": True,
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
    }
    evs = events(post(make_app(eng), "/v1/completions", body))
    assert "".join(e["choices"][0]["text"] for e in evs if e["choices"]) == "abHel"
    assert [
        e["choices"][0]["finish_reason"]
        for e in evs
        if e["choices"] and e["choices"][0]["finish_reason"]
    ] == ["length"]
    assert evs[-1]["usage"]["prompt_tokens"] == 3


def test_error_after_stream_started_is_in_band(eng: FakeEngine) -> None:
    eng.script = Script(error_after=2, error_message="step failed")
    text = post(
        make_app(eng),
        "/v1/chat/completions",
        {"model": FAKE_MODEL, "messages": USER, "stream": True},
    )
    evs = events(text)
    assert evs[-1] == {
        "error": {
            "message": "step failed",
            "type": "server_error",
            "param": None,
            "code": "engine_error",
        }
    }


async def test_keepalive_while_waiting_for_first_token(eng: FakeEngine) -> None:
    gate = asyncio.Event()
    eng.script = Script(gate=gate)
    app = make_app(eng, keepalive=0.01)
    body = json.dumps({"model": FAKE_MODEL, "messages": USER, "stream": True}).encode()
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body") == b": keep-alive\n\n":
            gate.set()  # after a keep-alive, let the first token arrive

    await app(asgi_scope("/v1/chat/completions"), asgi_receiver(body), send)
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    assert ": keep-alive" in text and "Hello world" == "".join(
        e["choices"][0]["delta"].get("content", "") for e in events(text)
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_engine_request(eng: FakeEngine, stream: bool) -> None:
    eng.script = Script(text="x" * 100, token_delay=0.001)
    app = make_app(eng)
    gone = asyncio.Event()
    body = json.dumps({"model": FAKE_MODEL, "messages": USER, "stream": stream, "n": 2}).encode()
    chunks = 0

    async def send(message: dict) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body":
            chunks += 1
            if chunks == 3:
                gone.set()

    async def disconnect_when_generating() -> None:
        while len(eng.active) < 2:
            await asyncio.sleep(0)
        gone.set()

    watcher = asyncio.ensure_future(
        disconnect_when_generating() if not stream else asyncio.sleep(0)
    )
    await asyncio.wait_for(
        app(asgi_scope("/v1/chat/completions"), asgi_receiver(body, gone), send), 5
    )
    await watcher
    assert (
        sorted(eng.aborted) == sorted(r.request_id for r in eng.requests) and len(eng.aborted) == 2
    )
    assert eng.finished == [] and not eng.active


def test_tool_call_arguments_stream_in_fragments(eng: FakeEngine) -> None:
    """id, type and name in a call's first delta; its arguments in fragments that add up to the
    non-streamed answer's."""
    from engine.output.events import ToolCall

    eng.add_model("big:latest", context_length=8192)
    args = '{"location": "Paris", "days": 3}'
    eng.script = Script(text="", tool_calls=[ToolCall(0, "get_weather", args)])
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    body = {"model": "big:latest", "messages": USER, "tools": [tool], "stream": True}
    app = make_app(eng)
    deltas = [
        d
        for e in events(post(app, "/v1/chat/completions", body))
        for c in e["choices"]
        for d in c["delta"].get("tool_calls", [])
    ]
    first, rest = deltas[0], deltas[1:]
    assert (first["index"], first["type"], first["function"]["name"]) == (
        0,
        "function",
        "get_weather",
    )
    assert first["id"].startswith("call_") and all("id" not in d for d in rest)
    assert len(rest) >= 3 and all(set(d) == {"index", "function"} for d in rest)
    assert "".join(d["function"]["arguments"] for d in deltas) == args
    with TestClient(app) as c:
        msg = c.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert msg["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == args
