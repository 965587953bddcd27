"""The `openai` SDK's Responses API against the real server and the real default model."""

from __future__ import annotations

import httpx
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
