"""Anthropic Messages over the fake engine: bodies, stream event order, errors in Anthropic's shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import engine  # noqa: F401  (BLAS preload before anything imports mlx)
from engine.errors import InsufficientMemoryError, QueueFullError
from engine.output.events import ToolCall
from engine.types import FinishReason
from tests.server.fake_engine import FAKE_CONTEXT, FAKE_MODEL, FakeEngine, Script, make_app
from tests.typed_sse import typed_events

URL = "/v1/messages"
BIG = "big:latest"  # room for the tool prompt the fake template gets
TOOL = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
USER = [{"role": "user", "content": "hi"}]


def body(**extra):
    return {"model": FAKE_MODEL, "max_tokens": 64, "messages": USER, **extra}


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng, keepalive=0.05), raise_server_exceptions=False) as c:
        yield c


def anthropic_error(r, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    data = r.json()
    assert data["type"] == "error" and set(data["error"]) == {"type", "message"}, data
    assert data["error"]["type"] == kind and data["error"]["message"]
    return data["error"]["message"]


def test_message_body_and_usage_match_count_tokens(client, eng):
    eng.script = Script(text="Hello world", cached_tokens=3)
    r = client.post(URL, json=body(system="Be brief."))
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["id"].startswith("msg_") and msg["type"] == "message"
    assert msg["role"] == "assistant" and msg["model"] == FAKE_MODEL
    assert msg["content"] == [{"type": "text", "text": "Hello world"}]
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    assert msg["usage"]["output_tokens"] == len("Hello world")
    assert msg["usage"]["cache_read_input_tokens"] == 3
    counted = client.post(URL + "/count_tokens", json=body(system="Be brief.")).json()
    # Anthropic's split: the uncached part plus the part the prefix cache read.
    assert counted == {"input_tokens": msg["usage"]["input_tokens"] + 3}
    prompt = "".join(chr(i - 3) for i in eng.requests[0].prompt_token_ids)
    assert prompt == "<system>Be brief.\n<user>hi\n<assistant>"


def test_system_blocks_prefill_and_sampling(client, eng):
    blocks = [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]
    msgs = [*USER, {"role": "assistant", "content": [{"type": "text", "text": "Sure:"}]}]
    r = client.post(
        URL,
        json=body(system=blocks, messages=msgs, temperature=0.5, top_p=0.9, top_k=40),
    )
    assert r.status_code == 200, r.text
    req = eng.requests[0]
    prompt = "".join(chr(i - 3) for i in req.prompt_token_ids)
    assert prompt == "<system>A\nB\n<user>hi\n<assistant>Sure:"  # the model continues "Sure:"
    assert (req.params.temperature, req.params.top_p, req.params.top_k) == (0.5, 0.9, 40)


def test_stop_sequence_and_max_tokens(client, eng):
    eng.script = Script(text="Hello world")
    msg = client.post(URL, json=body(stop_sequences=["wor"])).json()
    assert msg["content"][0]["text"] == "Hello "
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "wor")
    msg = client.post(URL, json=body(max_tokens=3)).json()
    assert msg["content"][0]["text"] == "Hel" and msg["stop_reason"] == "max_tokens"
    assert msg["usage"]["output_tokens"] == 3


def test_stream_event_order(client, eng):
    eng.script = Script(text="Hi there", first_delay=0.2, token_delay=0.08)
    r = client.post(URL, json=body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = typed_events(r.text)
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    n = kinds.count("content_block_delta")
    assert n > 1
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["type"] == "message_start"  # before it, keep-alives are SSE comments
    assert any(e["type"] == "ping" for e in events)  # idle gaps longer than the keep-alive
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "Hi there"
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len("Hi there")
    counted = client.post(URL + "/count_tokens", json=body()).json()["input_tokens"]
    assert start["usage"]["input_tokens"] == counted  # before the prompt is read: all of it
    final = delta["usage"]
    assert final["input_tokens"] + final["cache_read_input_tokens"] == counted


def test_stream_error_mid_answer_is_an_error_event(client, eng):
    eng.script = Script(text="Hello world", error_after=3)
    events = typed_events(client.post(URL, json=body(stream=True)).text)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"model": FAKE_MODEL, "messages": USER}, "max_tokens"),
        (body(max_tokens="5"), "max_tokens"),
        (body(max_tokens=0), "max_tokens"),
        (body(temperature=1.5), "temperature"),
        (body(messages="hi"), "messages"),
        (body(messages=[]), "messages"),
        (body(messages=[{"role": "system", "content": "x"}]), "messages[0].role"),
        (body(stop_sequences="x"), "stop_sequences"),
        (body(stream="yes"), "stream"),
        (body(tools=[{"name": "f", "input_schema": "x"}]), "tools[0].input_schema"),
        (body(tools=[{"name": "bad name", "input_schema": {}}]), "tools[0].name"),
        (body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type"),
        (body(tool_choice={"type": "any"}), "tool_choice"),
        (body(tools=[TOOL], tool_choice={"type": "tool", "name": "other"}), "tool_choice.name"),
        (body(tools=[TOOL], tool_choice={"type": "sometimes"}), "tool_choice.type"),
        (body(thinking={"type": "maybe"}), "thinking.type"),
        (body(output_config={"format": {"type": "xml"}}), "output_config.format.type"),
        (
            body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            "messages[0].content[0].type",
        ),
        (
            body(messages=[{"role": "user", "content": [{"type": "tool_use", "name": "f"}]}]),
            "messages[0].content[0].type",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_are_400_in_anthropic_shape(client, eng, payload, needle, stream):
    r = client.post(URL, json={**payload, "stream": stream} if "stream" not in payload else payload)
    assert needle in anthropic_error(r, 400, "invalid_request_error")
    assert eng.requests == []


def test_malformed_json_unknown_model_and_context(client, eng):
    r = client.post(URL, content=b"{not json", headers={"content-type": "application/json"})
    anthropic_error(r, 400, "invalid_request_error")
    for stream in (False, True):
        r = client.post(URL, json=body(model="nope:1", stream=stream))
        assert "nope:1" in anthropic_error(r, 404, "not_found_error")
        long = [{"role": "user", "content": "x" * FAKE_CONTEXT}]
        r = client.post(URL, json=body(messages=long, stream=stream))
        assert "context length" in anthropic_error(r, 400, "invalid_request_error")
    r = client.post(URL + "/count_tokens", json={"model": "nope:1", "messages": USER})
    anthropic_error(r, 404, "not_found_error")


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (QueueFullError("queue full"), 429, "rate_limit_error"),
        (InsufficientMemoryError("no memory"), 529, "overloaded_error"),
    ],
)
def test_engine_rejections_before_any_stream_byte(client, eng, exc, status, kind):
    eng.script = Script(reject=exc)
    for stream in (False, True):
        r = client.post(URL, json=body(stream=stream))
        anthropic_error(r, status, kind)
        assert r.headers.get("retry-after")


def test_x_api_key_and_anthropic_401(eng):
    with TestClient(make_app(eng, api_keys=["k1"])) as c:
        r = c.post(URL, json=body())
        anthropic_error(r, 401, "authentication_error")
        r = c.post(URL, json=body(), headers={"x-api-key": "k1", "anthropic-version": "2023-06-01"})
        assert r.status_code == 200 and r.json()["stop_reason"] == "end_turn"


def test_length_finish_in_stream(client, eng):
    eng.script = Script(text="Hello world", finish_reason=FinishReason.LENGTH)
    events = typed_events(client.post(URL, json=body(stream=True, max_tokens=4)).text)
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "max_tokens"


def test_tools_map_onto_the_output_spec_and_tool_use_comes_back(client, eng):
    eng.add_model(BIG, context_length=8192)
    eng.script = Script(text="", tool_calls=[ToolCall(0, "get_weather", '{"city": "Paris"}')])
    r = client.post(URL, json=body(model=BIG, tools=[TOOL], tool_choice={"type": "any"}))
    msg = r.json()
    spec = eng.requests[0].output
    assert spec.tool_choice == "required" and spec.tools[0].name == "get_weather"
    assert spec.tools[0].parameters == TOOL["input_schema"] and spec.reasoning is False
    assert msg["stop_reason"] == "tool_use"
    [block] = msg["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert block["name"] == "get_weather" and block["input"] == {"city": "Paris"}
    client.post(
        URL, json=body(model=BIG, tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    )
    assert (eng.requests[1].output.tool_choice, eng.requests[1].output.tool_name) == (
        "named",
        "get_weather",
    )
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    client.post(URL, json=body(model=BIG, tools=[TOOL], tool_choice=choice))
    assert eng.requests[2].output.parallel_tool_calls is False


def test_tool_use_streams_as_input_json_delta(client, eng):
    eng.add_model(BIG, context_length=8192)
    eng.script = Script(
        text="Let me check.", tool_calls=[ToolCall(0, "get_weather", '{"city": "Oslo"}')]
    )
    events = typed_events(client.post(URL, json=body(model=BIG, tools=[TOOL], stream=True)).text)
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["type"]) for e in starts] == [
        (0, "text"),
        (1, "tool_use"),
    ]
    assert starts[1]["content_block"]["input"] == {}
    json_deltas = [e for e in events if e.get("delta", {}).get("type") == "input_json_delta"]
    assert "".join(e["delta"]["partial_json"] for e in json_deltas) == '{"city": "Oslo"}'
    assert len(json_deltas) >= 3  # the input streams piece by piece
    assert all(e["index"] == 1 for e in json_deltas)
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert stops == [0, 1]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"


def test_tool_result_round_trip_reaches_the_template(client, eng):
    eng.add_model(BIG, context_length=8192)
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "18C"}],
                },
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    r = client.post(URL, json=body(model=BIG, tools=[TOOL], messages=msgs))
    assert r.status_code == 200, r.text
    prompt = "".join(chr(i - 3) for i in eng.requests[0].prompt_token_ids)
    # The fake template knows no tools: past calls and results are written as JSON envelopes.
    assert '"get_weather"' in prompt and '"city": "Paris"' in prompt
    assert "<tool>" in prompt and "18C" in prompt
    assert prompt.index("18C") < prompt.index("<user>Thanks!")
    counted = client.post(
        URL + "/count_tokens", json=body(model=BIG, tools=[TOOL], messages=msgs)
    ).json()
    assert counted["input_tokens"] == len(eng.requests[0].prompt_token_ids)


def test_thinking_blocks(client, eng):
    eng.script = Script(text="Paris.", reasoning="Hmm.")
    r = client.post(URL, json=body(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert eng.requests[0].output.reasoning is True
    assert eng.requests[0].output.reasoning_budget == 1024
    content = r.json()["content"]
    assert content[0] == {"type": "thinking", "thinking": "Hmm.", "signature": ""}
    assert content[1] == {"type": "text", "text": "Paris."}
    events = typed_events(client.post(URL, json=body(stream=True)).text)
    assert eng.requests[1].output.reasoning is False  # thinking is opt-in in this API
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking = [
        e["delta"]["thinking"] for e in events if e.get("delta", {}).get("type") == "thinking_delta"
    ]
    assert "".join(thinking) == "Hmm."


def test_output_config_format_is_a_json_schema(client, eng):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = client.post(
        URL, json=body(output_config={"format": {"type": "json_schema", "schema": schema}})
    )
    assert r.status_code == 200 and eng.requests[0].output.json_schema == schema
