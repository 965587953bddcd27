"""Every OpenAI-compatible response shape, validated against the OpenAI spec's own schemas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine.types import FinishReason
from tests.openai_spec import (
    COMPLETION_CHUNK,
    assert_valid,
    json_schema,
    schema_errors,
    sse_events,
)
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]
CHAT = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION = "CreateCompletionResponse"


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng)) as c:
        yield c


def ok(client: TestClient, path: str, **body: Any) -> dict[str, Any]:
    r = client.post(path, json={"model": FAKE_MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def stream(client: TestClient, path: str, **body: Any) -> list[dict[str, Any]]:
    r = client.post(path, json={"model": FAKE_MODEL, "stream": True, **body})
    assert r.status_code == 200, r.text
    return sse_events(r.text)


# --- the validator itself ---------------------------------------------------------------------


def test_validator_rejects_a_broken_body(client: TestClient) -> None:
    body = ok(client, "/v1/chat/completions", messages=USER)
    assert_valid(CHAT, body)
    broken = copy.deepcopy(body)
    del broken["choices"]
    assert any("'choices' is a required property" in e for e in schema_errors(CHAT, broken))
    broken = copy.deepcopy(body)
    broken["choices"][0]["finish_reason"] = "finished"
    assert schema_errors(CHAT, broken)
    broken = copy.deepcopy(body)
    broken["usage"]["total_tokens"] = "12"
    assert schema_errors(CHAT, broken)


def test_nullable_becomes_null_allowed() -> None:
    from jsonschema import Draft202012Validator

    openapi = {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "enum": ["stop"], "nullable": True},
            "strict": {"type": "string"},
            "nullable": {"type": "integer"},  # a property so named is not the keyword
        },
    }
    v = Draft202012Validator(json_schema(openapi))
    assert v.is_valid({"reason": None}) and v.is_valid({"reason": "stop"})
    assert not v.is_valid({"reason": "go"}) and not v.is_valid({"strict": None})
    assert not v.is_valid({"nullable": None}) and v.is_valid({"nullable": 3})


def test_stream_chunk_schema_needs_its_nullable_fields() -> None:
    choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "usage": None,
        "choices": [choice],
    }
    assert_valid(CHAT_CHUNK, chunk)
    choice["finish_reason"] = "done"
    assert schema_errors(CHAT_CHUNK, chunk)


# --- chat -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"logprobs": True, "top_logprobs": 2, "max_tokens": 4},
        {"n": 2, "seed": 3},
        {"max_completion_tokens": 3},  # finish_reason "length"
    ],
    ids=["plain", "logprobs", "n2", "length"],
)
def test_chat_completion_matches_spec(client: TestClient, extra: dict[str, Any]) -> None:
    body = ok(client, "/v1/chat/completions", messages=USER, **extra)
    assert_valid(CHAT, body)
    assert len(body["choices"]) == extra.get("n", 1) and body["usage"]["total_tokens"] > 0
    if extra.get("logprobs"):
        assert len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_chat_stream_chunks_match_spec(client: TestClient) -> None:
    chunks = stream(
        client,
        "/v1/chat/completions",
        messages=USER,
        n=2,
        logprobs=True,
        top_logprobs=1,
        stream_options={"include_usage": True},
    )
    for chunk in chunks:
        assert_valid(CHAT_CHUNK, chunk)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 22
    assert {c["choices"][0]["finish_reason"] for c in chunks[:-1]} == {None, "stop"}


def test_chat_stream_without_usage_matches_spec(client: TestClient, eng: FakeEngine) -> None:
    eng.script = Script(text="abc", finish_reason=FinishReason.LENGTH)
    chunks = stream(client, "/v1/chat/completions", messages=USER)
    for chunk in chunks:
        assert_valid(CHAT_CHUNK, chunk)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- completions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{}, {"echo": True, "logprobs": 2, "max_tokens": 3}, {"prompt": ["ab", "cd"], "n": 2}],
    ids=["plain", "echo-logprobs", "prompts-n"],
)
def test_completion_matches_spec(client: TestClient, extra: dict[str, Any]) -> None:
    body = ok(client, "/v1/completions", **{"prompt": "Say", **extra})
    assert_valid(COMPLETION, body)
    if extra.get("echo"):
        choice = body["choices"][0]
        assert choice["text"].startswith("Say") and choice["logprobs"]["tokens"]


def test_completion_stream_chunks_match_spec(client: TestClient) -> None:
    chunks = stream(
        client,
        "/v1/completions",
        prompt="Say",
        echo=True,
        logprobs=1,
        max_tokens=4,
        stream_options={"include_usage": True},
    )
    for chunk in chunks:
        assert_valid(COMPLETION_CHUNK, chunk)
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    # Only the final chunk of each choice may carry a finish_reason: it must be a real one.
    assert len(final) == 1
    assert_valid(COMPLETION, {**final[0], "usage": chunks[-1]["usage"]})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_completion_edge_shapes_match_spec(client: TestClient) -> None:
    assert_valid(COMPLETION, ok(client, "/v1/completions", prompt="Say", logprobs=0, max_tokens=2))
    assert_valid(COMPLETION, ok(client, "/v1/completions", prompt=[5, 6, 7], max_tokens=0))
    assert_valid(CHAT, ok(client, "/v1/chat/completions", messages=USER, max_tokens=0))


# --- models and errors ------------------------------------------------------------------------


def test_models_match_spec(client: TestClient, eng: FakeEngine) -> None:
    eng.add_model("other:7b")
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    assert_valid("ListModelsResponse", listing.json())
    assert len(listing.json()["data"]) == 2
    one = client.get(f"/v1/models/{FAKE_MODEL}")
    assert one.status_code == 200
    assert_valid("Model", one.json())


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", {"model": "no-such:model", "messages": USER}, 404),
        ("GET", "/v1/models/no-such:model", None, 404),
        (
            "POST",
            "/v1/chat/completions",
            {"model": FAKE_MODEL, "messages": USER, "temperature": 5},
            400,
        ),
        ("POST", "/v1/completions", {"model": FAKE_MODEL, "prompt": 3}, 400),
        ("POST", "/v1/chat/completions", {"model": FAKE_MODEL, "messages": []}, 400),
        ("GET", "/v1/no-such-route", None, 404),
    ],
    ids=["chat-404", "model-404", "chat-400", "completion-400", "empty-messages", "route-404"],
)
def test_error_bodies_match_spec(
    client: TestClient, method: str, path: str, body: Any, status: int
) -> None:
    r = client.request(method, path, json=body)
    assert r.status_code == status
    assert_valid("ErrorResponse", r.json())
    assert r.json()["error"]["message"]


def test_malformed_json_and_missing_key_errors_match_spec(eng: FakeEngine) -> None:
    with TestClient(make_app(eng, api_keys=["secret"])) as c:
        r = c.post("/v1/chat/completions", json={"model": FAKE_MODEL, "messages": USER})
        assert r.status_code == 401
        assert_valid("ErrorResponse", r.json())
        r = c.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"Authorization": "Bearer secret", "Content-Type": "application/json"},
        )
        assert r.status_code == 400
        assert_valid("ErrorResponse", r.json())


def test_in_band_stream_error_matches_spec(client: TestClient, eng: FakeEngine) -> None:
    eng.script = Script(error_after=2, error_message="step failed")
    chunks = stream(client, "/v1/chat/completions", messages=USER)
    errors = [c for c in chunks if "error" in c]
    assert len(errors) == 1 and chunks[-1] is errors[0]
    assert_valid("ErrorResponse", errors[0])
    for chunk in chunks[:-1]:
        assert_valid(CHAT_CHUNK, chunk)
