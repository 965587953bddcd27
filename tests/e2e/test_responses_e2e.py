"""The `openai` SDK's Responses API against the real server and the real default model."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.e2e
MODEL = "smollm2:135m"
ASK = "What is the capital of France?"


@pytest.fixture
def client(live_server: str):
    return openai.OpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0)


def test_responses_create(client):
    resp = client.responses.create(
        model=MODEL, input=ASK, instructions="Answer in one sentence.", temperature=0
    )
    assert resp.id.startswith("resp_") and resp.status == "completed"
    assert "Paris" in resp.output_text
    assert resp.output[0].type == "message" and resp.output[0].content[0].type == "output_text"
    assert resp.usage.input_tokens > 10 and resp.usage.output_tokens > 0


def test_responses_items_and_incomplete(client):
    items = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "input_text", "text": ASK}]},
    ]
    resp = client.responses.create(model=MODEL, input=items, max_output_tokens=3, temperature=0)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3


def test_responses_stream_final_text_equals_deltas(client):
    deltas, kinds = [], []
    with client.responses.stream(model=MODEL, input=ASK, temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert len(deltas) > 1 and final.output_text == "".join(deltas)


def test_responses_errors(client, live_server: str):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope:1", input=ASK)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=ASK, previous_response_id="resp_abc")
    assert "stateless" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=ASK, store=True)
    for stream in (False, True):
        r = httpx.post(
            live_server + "/v1/responses",
            json={"model": MODEL, "input": "word " * 9000, "stream": stream},
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(
            live_server + "/v1/responses",
            json={"model": MODEL, "input": ASK, "temperature": "hot", "stream": stream},
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_text_format_json_schema(client):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    resp = client.responses.create(
        model=MODEL,
        input=ASK,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
    )
    data = json.loads(resp.output_text)
    jsonschema.validate(data, schema)


def test_function_tool_gives_a_function_call_item_and_round_trips(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    resp = client.responses.create(
        model=MODEL,
        input=ask,
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    call = next(item for item in resp.output if item.type == "function_call")
    assert call.id.startswith("fc_") and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments).get("city"), str)
    follow = [
        *ask,
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ]
    answer = client.responses.create(
        model=MODEL, input=follow, tools=[WEATHER], max_output_tokens=40, temperature=0
    )
    assert answer.status in ("completed", "incomplete") and answer.output


def test_function_call_streams(client):
    with client.responses.stream(
        model=MODEL,
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert "".join(deltas) == call.arguments and "city" in json.loads(call.arguments)
