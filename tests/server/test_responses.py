"""OpenAI Responses over the fake engine: objects, the stream's event sequence, errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import engine  # noqa: F401  (BLAS preload before anything imports mlx)
from engine.errors import QueueFullError
from engine.output.events import ToolCall
from tests.server.fake_engine import FAKE_CONTEXT, FAKE_MODEL, FakeEngine, Script, make_app
from tests.typed_sse import typed_events

URL = "/v1/responses"
BIG = "big:latest"  # room for the tool prompt the fake template gets
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def body(**extra):
    return {"model": FAKE_MODEL, "input": "hi", **extra}


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng, keepalive=0.05), raise_server_exceptions=False) as c:
        yield c


def openai_error(r, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e["message"]


def prompt_of(eng: FakeEngine) -> str:
    return "".join(chr(i - 3) for i in eng.requests[-1].prompt_token_ids)


def test_response_object(client, eng):
    eng.script = Script(text="Hello world", cached_tokens=2)
    r = client.post(URL, json=body(instructions="Be brief.", temperature=0.3, top_p=0.5))
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"].startswith("resp_") and resp["object"] == "response"
    assert resp["status"] == "completed" and resp["incomplete_details"] is None
    [item] = resp["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"][0]["type"] == "output_text"
    assert item["content"][0]["text"] == "Hello world"
    usage = resp["usage"]
    assert usage["output_tokens"] == 11 and usage["input_tokens_details"]["cached_tokens"] == 2
    assert usage["total_tokens"] == usage["input_tokens"] + 11
    assert usage["input_tokens"] == len(eng.requests[0].prompt_token_ids)
    assert prompt_of(eng) == "<system>Be brief.\n<user>hi\n<assistant>"
    assert (eng.requests[0].params.temperature, eng.requests[0].params.top_p) == (0.3, 0.5)
    assert resp["store"] is False and resp["temperature"] == 0.3


def test_input_items(client, eng):
    items = [
        {"role": "developer", "content": "Sys."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ]
    assert client.post(URL, json=body(input=items)).status_code == 200
    assert prompt_of(eng) == "<system>Sys.\n<user>a\n<assistant>b\n<user>c\n<assistant>"


def test_max_output_tokens_is_incomplete(client, eng):
    resp = client.post(URL, json=body(max_output_tokens=4)).json()
    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["content"][0]["text"] == "Hell"


def test_stream_event_sequence(client, eng):
    eng.script = Script(text="Hi there")
    r = client.post(URL, json=body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in typed_events(r.text)]
    kinds = [e["type"] for e in events]
    n = kinds.count("response.output_text.delta")
    assert n > 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"] == final["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in deltas) == "Hi there"
    item_id = final["output"][0]["id"]
    for e in events[2:-1]:
        assert e["output_index"] == 0
        assert e.get("item_id", e.get("item", {}).get("id")) == item_id
        if "content_index" in e:
            assert e["content_index"] == 0
    assert events[-4]["text"] == "Hi there"
    assert final["output"][0]["content"][0]["text"] == "Hi there"
    assert final["usage"]["output_tokens"] == len("Hi there")


def test_stream_incomplete_and_error_event(client, eng):
    events = typed_events(client.post(URL, json=body(stream=True, max_output_tokens=3)).text)
    assert events[-1]["type"] == "response.incomplete"
    eng.script = Script(text="Hello world", error_after=3)
    events = typed_events(client.post(URL, json=body(stream=True)).text)
    assert events[-1]["type"] == "error" and events[-1]["message"]
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"model": FAKE_MODEL}, "input"),
        (body(input=5), "input"),
        (body(input=[]), "input"),
        (body(max_output_tokens="5"), "max_output_tokens"),
        (body(temperature=3), "temperature"),
        (body(stream="yes"), "stream"),
        (body(previous_response_id="resp_1"), "previous_response_id"),
        (body(store=True), "store"),
        (body(tools=[{"type": "web_search"}]), "tools[0].type"),
        (body(tools=[{"type": "function", "name": "a b"}]), "tools[0].name"),
        (body(tools=[{"type": "function", "name": "f", "parameters": "x"}]), "tools[0].parameters"),
        (body(tool_choice="required"), "tool_choice"),
        (body(tools=[TOOL], tool_choice={"type": "function", "name": "g"}), "tool_choice"),
        (body(tool_choice="sometimes"), "tool_choice"),
        (body(text={"format": {"type": "xml"}}), "text.format.type"),
        (body(text={"format": {"type": "json_schema", "schema": "x"}}), "text.format.schema"),
        (
            body(
                tools=[
                    {
                        **TOOL,
                        "strict": True,
                        "parameters": {"type": "object", "additionalProperties": True},
                    }
                ]
            ),  # fmt: skip
            "tools[0].parameters",
        ),
        (body(input=[{"type": "web_search_call", "id": "x"}]), "input[0].type"),
        (body(input=[{"type": "function_call", "call_id": "c", "name": "f"}]), "input[0]"),
        (
            body(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]),
            "input[0].arguments",
        ),
        (body(input=[{"role": "robot", "content": "x"}]), "input[0].role"),
        (
            body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            "input[0].content[0].type",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests(client, eng, payload, param, stream):
    payload = {**payload, "stream": stream} if "stream" not in payload else payload
    openai_error(client.post(URL, json=payload), 400, param)
    assert eng.requests == []


def test_malformed_json_unknown_model_context_and_rejection(client, eng):
    r = client.post(URL, content=b"[1,", headers={"content-type": "application/json"})
    openai_error(r, 400)
    for stream in (False, True):
        openai_error(client.post(URL, json=body(model="nope:1", stream=stream)), 404, "model")
        long = body(input="x" * FAKE_CONTEXT, stream=stream)
        assert "context length" in openai_error(client.post(URL, json=long), 400, "input")
        r = client.post(URL, json=body(input="x" * 200, max_output_tokens=100, stream=stream))
        openai_error(r, 400, "max_output_tokens")
    eng.script = Script(reject=QueueFullError("queue full"))
    for stream in (False, True):
        r = client.post(URL, json=body(stream=stream))
        openai_error(r, 429)
        assert r.headers.get("retry-after")


def test_store_false_and_harmless_fields_accepted(client):
    r = client.post(
        URL,
        json=body(
            store=False, tool_choice="auto", text={"format": {"type": "text"}}, metadata={"a": "b"}
        ),
    )
    assert r.status_code == 200 and r.json()["metadata"] == {"a": "b"}


def test_function_tools_and_function_call_items(client, eng):
    eng.add_model(BIG, context_length=8192)
    eng.script = Script(text="", tool_calls=[ToolCall(0, "get_weather", '{"city": "Paris"}')])
    resp = client.post(URL, json=body(model=BIG, tools=[TOOL], tool_choice="required")).json()
    spec = eng.requests[0].output
    assert spec.tool_choice == "required" and spec.tools[0].parameters == TOOL["parameters"]
    assert spec.tools[0].strict is False
    [item] = resp["output"]
    assert item["type"] == "function_call" and item["id"].startswith("fc_")
    assert item["call_id"] and item["name"] == "get_weather"
    assert item["arguments"] == '{"city": "Paris"}' and item["status"] == "completed"
    named = {"type": "function", "name": "get_weather"}
    client.post(
        URL, json=body(model=BIG, tools=[TOOL], tool_choice=named, parallel_tool_calls=False)
    )
    spec = eng.requests[1].output
    assert (spec.tool_choice, spec.tool_name, spec.parallel_tool_calls) == (
        "named",
        "get_weather",
        False,
    )
    client.post(URL, json=body(model=BIG, tools=[{**TOOL, "strict": True}]))
    assert eng.requests[-1].output.tools[0].strict is True  # OpenAI's strict mode


def test_function_call_stream_events(client, eng):
    eng.add_model(BIG, context_length=8192)
    eng.script = Script(text="Ok.", tool_calls=[ToolCall(0, "get_weather", '{"city": "Oslo"}')])
    events = typed_events(client.post(URL, json=body(model=BIG, tools=[TOOL], stream=True)).text)
    kinds = [e["type"] for e in events]
    n = kinds.count("response.output_text.delta")
    pieces = kinds.count("response.function_call_arguments.delta")
    assert pieces >= 3  # the arguments stream piece by piece
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * pieces,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    call_events = events[-4 - pieces : -1]
    deltas = [e["delta"] for e in call_events if e["type"].endswith("arguments.delta")]
    assert "".join(deltas) == '{"city": "Oslo"}' == call_events[-2]["arguments"]
    assert {e["output_index"] for e in call_events} == {1}
    assert (
        call_events[0]["item"]["arguments"] == ""
        and call_events[-1]["item"]["arguments"] == '{"city": "Oslo"}'
    )
    final = events[-1]["response"]["output"]
    assert [i["type"] for i in final] == ["message", "function_call"]


def test_function_call_round_trip_reaches_the_template(client, eng):
    eng.add_model(BIG, context_length=8192)
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    ]
    r = client.post(URL, json=body(model=BIG, input=items, tools=[TOOL]))
    assert r.status_code == 200, r.text
    prompt = "".join(chr(i - 3) for i in eng.requests[0].prompt_token_ids)
    assert '"get_weather"' in prompt and '"city": "Paris"' in prompt and "18C" in prompt


def test_reasoning_item_and_text_format(client, eng):
    eng.script = Script(text="{}", reasoning="Hmm.")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "x", "schema": schema, "strict": True}
    resp = client.post(URL, json=body(text={"format": fmt})).json()
    assert eng.requests[0].output.json_schema == schema and eng.requests[0].output.reasoning
    assert [i["type"] for i in resp["output"]] == ["reasoning", "message"]
    assert resp["output"][0]["content"] == [{"type": "reasoning_text", "text": "Hmm."}]
    assert resp["output"][0]["id"].startswith("rs_")
    assert resp["usage"]["output_tokens"] == 6  # "Hmm." and "{}", a token a character
    assert resp["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    client.post(
        URL, json=body(text={"format": {"type": "json_object"}}, reasoning={"effort": "none"})
    )
    assert eng.requests[1].output.json_schema == {"type": "object"}
    assert eng.requests[1].output.reasoning is False
    events = typed_events(client.post(URL, json=body(stream=True)).text)
    kinds = [e["type"] for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.reasoning_text.delta"]
    done = kinds.index("response.reasoning_text.done")
    assert kinds[done + 1] == "response.output_item.done"
    assert events[done + 2]["output_index"] == 1  # the message comes second
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == "Hmm."
