"""The official `openai` client (strict validation, no retries) against the real server and model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.openai_spec import assert_valid, sse_events

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live_server + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=120,
        _strict_response_validation=True,
    )


def test_chat_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage and r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16


def test_chat_stream_equals_non_stream_greedy(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=HI, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert len({c.id for c in chunks}) == 1
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.choices[0].text and r.usage and r.usage.completion_tokens <= 8
    r = client.completions.create(
        model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, echo=True
    )
    assert r.choices[0].text.startswith("One, two,")


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).owned_by == "mlxd"


def test_stop_strings_never_appear(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 20, comma separated."}],
        max_tokens=48,
        temperature=0,
    )
    free = client.chat.completions.create(**kw).choices[0].message.content or ""
    stop = "5, 6" if "5, 6" in free else free[len(free) // 2 : len(free) // 2 + 3]
    for stream in (False, True):
        if stream:
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**kw, stop=[stop], stream=True)
                if c.choices
            )
        else:
            text = (
                client.chat.completions.create(**kw, stop=[stop]).choices[0].message.content or ""
            )
        assert stop not in text and free.startswith(text)


def test_n_3(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, n=3, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_seeded_requests_reproduce(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=HI, max_tokens=16, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such:model", messages=HI)
    assert e.value.code == "model_not_found"


def test_context_length_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=10_000_000)
    assert e.value.code == "context_length_exceeded"


def test_bad_field_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=HI,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    assert e.value.param == "tool_choice"


def test_raw_responses_match_openai_spec(live_server: str) -> None:
    # Raw JSON (not the client's models) against the spec's schemas: see tests/openai_spec.py.
    body = {"model": MODEL, "messages": HI, "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=live_server + "/v1", timeout=120) as http:
        r = http.post("/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200, r.text
        assert_valid("CreateChatCompletionResponse", r.json())
        r = http.post(
            "/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
        assert r.status_code == 200, r.text
        chunks = sse_events(r.text)
        assert len(chunks) >= 3 and chunks[-1]["choices"] == []
        for chunk in chunks:
            assert_valid("CreateChatCompletionStreamResponse", chunk)
        r = http.get("/models")
        assert r.status_code == 200
        assert_valid("ListModelsResponse", r.json())
        assert MODEL in [m["id"] for m in r.json()["data"]]
