"""The `anthropic` SDK against the real server and the real default model."""

from __future__ import annotations

import httpx
import pytest

from tests.typed_sse import typed_events

anthropic = pytest.importorskip("anthropic")
pytestmark = pytest.mark.e2e
MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
# Recent SDKs dropped the sampling fields from their signatures; the API still takes them.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture
def client(live_server: str):
    return anthropic.Anthropic(base_url=live_server, api_key="unused", max_retries=0)


def test_messages_create(client):
    msg = client.messages.create(
        model=MODEL, max_tokens=40, messages=ASK, system="Answer in one sentence.", **GREEDY
    )
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.model == MODEL
    assert msg.content[0].type == "text" and "Paris" in msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert 0 < msg.usage.output_tokens <= 40 and msg.usage.input_tokens > 10


def test_stop_sequence_and_max_tokens(client):
    msg = client.messages.create(
        model=MODEL, max_tokens=40, messages=ASK, stop_sequences=["Paris"], **GREEDY
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "Paris"
    assert "Paris" not in msg.content[0].text
    msg = client.messages.create(model=MODEL, max_tokens=3, messages=ASK, **GREEDY)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


def test_stream_final_message_and_count_tokens(client):
    with client.messages.stream(
        model=MODEL, max_tokens=40, messages=ASK, extra_body={"temperature": 0.7, "top_k": 40}
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(deltas) > 1 and "".join(deltas) == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model=MODEL, messages=ASK)
    assert counted.input_tokens == final.usage.input_tokens + (
        final.usage.cache_read_input_tokens or 0
    )


def test_raw_stream_events_and_count(live_server: str):
    body = {"model": MODEL, "max_tokens": 8, "messages": ASK, "stream": True}
    r = httpx.post(live_server + "/v1/messages", json=body, timeout=120)
    events = typed_events(r.text)
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    counted = httpx.post(live_server + "/v1/messages/count_tokens", json=body, timeout=60).json()
    assert counted["input_tokens"] == events[0]["message"]["usage"]["input_tokens"]


def test_errors_in_anthropic_shape(client, live_server: str):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope:1", max_tokens=8, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=MODEL, max_tokens=8, messages=ASK, extra_body={"temperature": 7}
        )
    assert e.value.body["error"]["type"] == "invalid_request_error"
    huge = [{"role": "user", "content": "word " * 9000}]
    for stream in (False, True):
        r = httpx.post(
            live_server + "/v1/messages",
            json={"model": MODEL, "max_tokens": 8, "messages": huge, "stream": stream},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "context length" in r.json()["error"]["message"]
    r = httpx.post(
        live_server + "/v1/messages", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["type"] == "error"


WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_tool_choice_any_gives_tool_use_and_a_tool_result_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    msg = client.messages.create(
        model=MODEL,
        max_tokens=60,
        messages=ask,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        **GREEDY,
    )
    assert msg.stop_reason == "tool_use"
    call = next(b for b in msg.content if b.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input, dict)
    assert isinstance(call.input.get("city"), str)
    follow = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}],
        },
    ]
    answer = client.messages.create(
        model=MODEL, max_tokens=40, messages=follow, tools=[WEATHER], **GREEDY
    )
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert answer.content
    counted = client.messages.count_tokens(model=MODEL, messages=follow, tools=[WEATHER])
    assert counted.input_tokens == answer.usage.input_tokens + (
        answer.usage.cache_read_input_tokens or 0
    )


def test_tool_use_streams(client):
    with client.messages.stream(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        **GREEDY,
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = next(b for b in final.content if b.type == "tool_use")
    assert isinstance(call.input, dict) and "city" in call.input
