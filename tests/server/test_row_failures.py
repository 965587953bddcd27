"""A request whose only row fails in the engine before its first token: the status says whose
fault it was (400 the request's, 500 the engine's, 503 the engine can't serve it now), the body
is the API's own error shape with the engine's message, streamed or not."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]
APIS = {
    "openai": ("/v1/chat/completions", {"messages": USER}),
    "ollama": ("/api/chat", {"messages": USER}),
    "anthropic": ("/v1/messages", {"messages": USER, "max_tokens": 8}),
    "responses": ("/v1/responses", {"input": "hi"}),
}
STATUS = {"request": 400, "internal": 500, "unavailable": 503}


ANTHROPIC_TYPES = {400: "invalid_request_error", 500: "api_error", 529: "overloaded_error"}


def message_of(api: str, body: dict, status: int) -> str:
    """The error's message, after checking the body is `api`'s error shape."""
    if api == "ollama":
        assert set(body) == {"error"}
        return body["error"]
    if api == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == ANTHROPIC_TYPES[status]
        return body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", list(STATUS))
@pytest.mark.parametrize("api", list(APIS))
def test_a_row_failing_before_its_first_token(api: str, kind: str, stream: bool) -> None:
    eng = FakeEngine(Script(error_after=0, error_message=f"{kind} failure", error_kind=kind))  # type: ignore[arg-type]
    path, body = APIS[api]
    with TestClient(make_app(eng)) as c:
        r = c.post(path, json={"model": FAKE_MODEL, "stream": stream, **body})
    want = STATUS[kind]
    if api == "anthropic" and want == 503:
        want = 529  # Anthropic's "overloaded"
    assert r.status_code == want, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message_of(api, r.json(), want) == f"{kind} failure"
    if kind == "unavailable":
        assert int(r.headers["retry-after"]) >= 1
