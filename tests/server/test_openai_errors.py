"""Every OpenAI error case: status, shape {"error": {message, type, param, code}}, no leaks."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engine.errors import (
    ContextLengthError,
    EngineShuttingDownError,
    InsufficientMemoryError,
    ModelLoadError,
    QueueFullError,
)
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng), raise_server_exceptions=False) as c:
        yield c


def err(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code
    if param is not None:
        assert e["param"] == param
    return e


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER}, "model"),
        ({"model": FAKE_MODEL}, "messages"),
        ({"model": FAKE_MODEL, "messages": "hi"}, "messages"),
        ({"model": FAKE_MODEL, "messages": []}, "messages"),
        (
            {"model": FAKE_MODEL, "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
        ),
        ({"model": FAKE_MODEL, "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": FAKE_MODEL, "messages": USER, "temperature": 3}, "temperature"),
        ({"model": FAKE_MODEL, "messages": USER, "max_tokens": -1}, "max_tokens"),
        ({"model": FAKE_MODEL, "messages": USER, "n": 0}, "n"),
        ({"model": FAKE_MODEL, "messages": USER, "top_logprobs": 21}, "top_logprobs"),
        ({"model": FAKE_MODEL, "messages": USER, "stream": "yes"}, "stream"),
        ({"model": FAKE_MODEL, "messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
    ],
)
def test_invalid_fields_are_400_with_param(client: TestClient, body: dict, param: str) -> None:
    err(client.post(CHAT, json=body), 400, param=param)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_unsupported_fields_are_named(client: TestClient, extra: dict, param: str) -> None:
    e = err(
        client.post(CHAT, json={"model": FAKE_MODEL, "messages": USER, **extra}),
        400,
        "unsupported_parameter",
        param,
    )
    assert param in e["message"]


OPEN = {"type": "object", "properties": {"a": {"type": "object", "additionalProperties": True}}}
PARTIAL = {  # strict mode needs every property required (optional ones are unions with null)
    "type": "object",
    "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
    "required": ["a"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "needs json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "strin"}},
                }
            },
            "response_format.json_schema.schema",
            "strin",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"not": {"type": "string"}}},
                    }
                ]
            },
            "tools[0].function.parameters",
            '"not"',
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
            "not JSON",
        ),
        (
            {
                "tools": [
                    {
                        **WEATHER,
                        "function": {**WEATHER["function"], "strict": True, "parameters": OPEN},
                    }
                ]
            },  # fmt: skip
            "tools[0].function.parameters",
            "additionalProperties: false",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "strict": True, "schema": OPEN},
                }
            },  # fmt: skip
            "response_format.json_schema.schema",
            "additionalProperties: false",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "strict": True, "schema": PARTIAL},
                }
            },  # fmt: skip
            "response_format.json_schema.schema",
            "missing 'b'",
        ),
    ],
)
def test_structured_output_bad_input_names_the_field(
    client: TestClient, extra: dict, param: str, words: str
) -> None:
    body = {"model": FAKE_MODEL, "messages": USER, **extra}
    e = err(client.post(CHAT, json=body), 400, param=param)
    assert words in e["message"]


def test_strict_marks_the_schema_to_be_closed(client: TestClient, eng: FakeEngine) -> None:
    """strict: true (OpenAI's structured outputs) reaches the engine's spec; without it, the
    schema stays as JSON Schema reads it."""
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "object"}}}  # fmt: skip
    eng.add_model("big:latest", context_length=8192)  # room for the tool prompt
    for tools, rf in (([WEATHER], None), ([strict], fmt)):
        body = {"model": "big:latest", "messages": USER, "tools": tools}
        if rf is not None:
            body["response_format"] = rf
        assert client.post(CHAT, json=body).status_code == 200
    loose, tight = eng.requests[-2].output, eng.requests[-1].output
    assert (loose.tools[0].strict, loose.strict_schema) == (False, False)
    assert (tight.tools[0].strict, tight.strict_schema) == (True, True)


def test_harmless_fields_and_text_format_pass(client: TestClient) -> None:
    r = client.post(
        CHAT,
        json={
            "model": FAKE_MODEL,
            "messages": USER,
            "response_format": {"type": "text"},
            "store": False,
            "metadata": {"a": "b"},
        },
    )
    assert r.status_code == 200


def test_non_text_content_part(client: TestClient) -> None:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    err(
        client.post(CHAT, json={"model": FAKE_MODEL, "messages": msg}),
        400,
        param="messages[0].content[0]",
    )


def test_completions_unsupported_and_bad_prompt(client: TestClient) -> None:
    err(
        client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": "a", "suffix": "b"}),
        400,
        param="suffix",
    )
    err(
        client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": [[]]}),
        400,
        param="prompt",
    )
    e = err(client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": [-1]}), 400)
    # the token-id member's complaint, not the string member's "Input should be a valid string"
    assert "'prompt[0]': Input should be greater than or equal to 0" in e["message"], e
    assert e["param"] == "prompt"
    e = err(
        client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": [[1], [2**40]]}), 400
    )
    assert "'prompt[1][0]': Input should be less than or equal to" in e["message"], e
    err(client.post("/v1/completions", json={"model": FAKE_MODEL}), 400, param="prompt")


def test_malformed_json_and_bad_utf8(client: TestClient) -> None:
    err(
        client.post(CHAT, content=b'{"model": ', headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    err(client.post(CHAT, content=b'{"model": "\xff"}'), 400, "invalid_encoding")
    err(client.post(CHAT, content=b"[1, 2]"), 400, "invalid_json")


def test_unknown_route_and_method(client: TestClient) -> None:
    err(client.get("/v1/nothing"), 404, "not_found")
    err(client.get(CHAT), 405)


def test_unknown_model(client: TestClient) -> None:
    err(
        client.post(CHAT, json={"model": "nope:1", "messages": USER}),
        404,
        "model_not_found",
        "model",
    )
    err(client.get("/v1/models/nope:1"), 404, "model_not_found")


def test_no_chat_template(client: TestClient, eng: FakeEngine) -> None:
    eng.add_model("base:latest", chat_template=None)
    e = err(
        client.post(CHAT, json={"model": "base:latest", "messages": USER}), 400, "no_chat_template"
    )
    assert "chat template" in e["message"]


def test_context_length_checked_before_engine(client: TestClient, eng: FakeEngine) -> None:
    err(
        client.post(CHAT, json={"model": FAKE_MODEL, "messages": USER, "max_tokens": 250}),
        400,
        "context_length_exceeded",
    )
    long = [{"role": "user", "content": "x" * 300}]
    err(
        client.post(CHAT, json={"model": FAKE_MODEL, "messages": long, "stream": True}),
        400,
        "context_length_exceeded",
    )
    assert eng.requests == []


def test_limits_on_messages_and_stop(eng: FakeEngine) -> None:
    with TestClient(make_app(eng, max_messages=2, max_stop_strings=1)) as c:
        err(c.post(CHAT, json={"model": FAKE_MODEL, "messages": USER * 3}), 400, param="messages")
        err(
            c.post(CHAT, json={"model": FAKE_MODEL, "messages": USER, "stop": ["a", "b"]}),
            400,
            param="stop",
        )


@pytest.mark.parametrize(
    ("exc", "status", "retry"),
    [
        (QueueFullError("queue full"), 429, True),
        (InsufficientMemoryError("no memory"), 503, True),
        (EngineShuttingDownError(), 503, True),
        (ContextLengthError(200, 100, 256), 400, False),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_engine_rejections(
    client: TestClient, eng: FakeEngine, exc, status: int, retry: bool, stream: bool
) -> None:
    eng.script = Script(reject=exc)
    r = client.post(CHAT, json={"model": FAKE_MODEL, "messages": USER, "stream": stream})
    err(r, status)
    assert ("retry-after" in r.headers) is retry


def test_model_load_error_names_model(client: TestClient, eng: FakeEngine) -> None:
    eng.load_errors[FAKE_MODEL] = ModelLoadError(FAKE_MODEL, "corrupt weights")
    e = err(
        client.post(CHAT, json={"model": FAKE_MODEL, "messages": USER}), 503, "model_load_failed"
    )
    assert FAKE_MODEL in e["message"]


def test_unexpected_error_leaks_nothing(client: TestClient, eng: FakeEngine) -> None:
    eng.script = Script(reject=RuntimeError("boom at /home/secret/file.py 0x7f00deadbeef"))
    r = client.post(CHAT, json={"model": FAKE_MODEL, "messages": USER})
    e = err(r, 500)
    assert "secret" not in r.text and "0x7f" not in r.text and "Traceback" not in r.text
    assert e["message"] == "internal server error" and r.headers["x-request-id"]


def test_engine_error_mid_request_non_stream(client: TestClient, eng: FakeEngine) -> None:
    eng.script = Script(error_after=3, error_message="step failed")
    e = err(client.post(CHAT, json={"model": FAKE_MODEL, "messages": USER}), 500)
    assert e["message"] == "step failed"


def test_api_keys(eng: FakeEngine) -> None:
    with TestClient(make_app(eng, api_keys=["k1", "k2"])) as c:
        e = err(c.post(CHAT, json={"model": FAKE_MODEL, "messages": USER}), 401, "invalid_api_key")
        assert "key" in e["message"]
        err(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        err(c.get("/v1/models", headers={"Authorization": "Basic k1"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/health").status_code == 200
        r = c.get("/api/tags")  # Ollama paths get Ollama's error shape
        assert r.status_code == 401 and isinstance(r.json()["error"], str)


def test_body_limit(eng: FakeEngine) -> None:
    with TestClient(make_app(eng, max_body_bytes=100)) as c:
        big = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x" * 200}]}
        err(c.post(CHAT, json=big), 413)

        def chunks():
            yield b'{"model": "fake:latest", "messages": [{"role": "user", "content": "'
            yield b"x" * 200
            yield b'"}]}'

        err(c.post(CHAT, content=chunks()), 413)


def test_cors_only_when_configured(eng: FakeEngine) -> None:
    pre = {"Origin": "http://ui.local", "Access-Control-Request-Method": "POST"}
    with TestClient(make_app(eng)) as c:
        assert "access-control-allow-origin" not in c.options(CHAT, headers=pre).headers
    with TestClient(make_app(FakeEngine(), cors_origins=["http://ui.local"], api_keys=["k"])) as c:
        r = c.options(CHAT, headers=pre)
        assert r.headers["access-control-allow-origin"] == "http://ui.local"


def test_cors_preflight_allows_the_sdks_browser_headers() -> None:
    """Browser clients of the Anthropic API send x-api-key and anthropic-version (and the SDKs
    their x-stainless-* headers): the preflight allows them, and the request then passes."""
    app = make_app(FakeEngine(), cors_origins=["http://ui.local"], api_keys=["k"])
    sent = "x-api-key, anthropic-version, anthropic-dangerous-direct-browser-access, x-stainless-os"
    pre = {
        "Origin": "http://ui.local",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": f"content-type, {sent}",
    }
    with TestClient(app) as c:
        r = c.options("/v1/messages", headers=pre)
        assert r.status_code == 200, r.text
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {h.strip() for h in sent.split(",")} <= allowed
        bad = c.options("/v1/messages", headers={**pre, "Access-Control-Request-Headers": "x-evil"})
        assert bad.status_code == 400
        body = {"model": FAKE_MODEL, "max_tokens": 4, "messages": USER}
        headers = {"Origin": "http://ui.local", "x-api-key": "k", "anthropic-version": "2023-06-01"}
        r = c.post("/v1/messages", json=body, headers=headers)
        assert (
            r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.local"
        )
