"""Chat and text completions over HTTP against the FakeEngine: bodies, params, n, usage, echo."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engine.types import FinishReason
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script, make_app

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng)) as c:
        yield c


def chat(client: TestClient, **body):
    return client.post("/v1/chat/completions", json={"model": FAKE_MODEL, "messages": USER, **body})


def test_lifespan_starts_and_stops_engine(eng: FakeEngine) -> None:
    with TestClient(make_app(eng)) as c:
        assert eng.started == 1 and c.get("/health").json() == {"status": "ok"}
    assert eng.shutdowns == 1


def test_health_503_when_engine_dead(eng: FakeEngine, client: TestClient) -> None:
    eng.alive = False
    assert client.get("/health").status_code == 503


def test_chat_basic_body_and_usage(client: TestClient, eng: FakeEngine) -> None:
    r = chat(client)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == FAKE_MODEL
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello world",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = "<user>hi\n<assistant>"
    assert eng.requests[0].prompt_token_ids == eng.models[FAKE_MODEL].tokenizer.encode(
        prompt, False
    )
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 11,
        "total_tokens": len(prompt) + 11,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert body["x_timings"]["completion_tokens"] == 11
    assert r.headers["x-request-id"]


def test_client_request_id_is_echoed(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": FAKE_MODEL, "messages": USER},
        headers={"X-Request-Id": "abc-123"},
    )
    assert r.headers["x-request-id"] == "abc-123"


def test_sampling_params_reach_engine(client: TestClient, eng: FakeEngine) -> None:
    r = chat(
        client,
        max_completion_tokens=5,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["x", "y"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100},
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        user="u1",
        some_unknown_field=True,
    )
    assert r.status_code == 200, r.text
    p = eng.requests[0].params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (5, 0.5, 0.9, 7)
    assert (p.stop, p.presence_penalty, p.frequency_penalty) == (["x", "y"], 0.5, -0.5)
    assert (p.logit_bias, p.top_k, p.min_p, p.repetition_penalty) == ({42: -100.0}, 20, 0.05, 1.1)
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_ignore_eos_extension_reaches_engine(client: TestClient, eng: FakeEngine) -> None:
    assert chat(client).status_code == 200 and not eng.requests[0].params.ignore_eos
    assert chat(client, ignore_eos=True).status_code == 200
    assert eng.requests[1].params.ignore_eos
    r = client.post(
        "/v1/completions", json={"model": FAKE_MODEL, "prompt": "a", "ignore_eos": True}
    )
    assert r.status_code == 200 and eng.requests[2].params.ignore_eos
    r = chat(client, ignore_eos="yes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


def test_default_max_tokens_is_rest_of_context(client: TestClient, eng: FakeEngine) -> None:
    chat(client)
    req = eng.requests[0]
    assert req.params.max_tokens == 256 - len(req.prompt_token_ids)


def test_default_max_tokens_setting_applies_when_a_request_gives_none(eng: FakeEngine) -> None:
    with TestClient(make_app(eng, default_max_tokens=7)) as c:
        assert chat(c).status_code == 200
        assert c.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": "x"}).is_success
        assert chat(c, max_tokens=3).status_code == 200
        body = {"model": FAKE_MODEL, "messages": USER, "stream": False}
        assert c.post("/api/chat", json=body).status_code == 200
        body["options"] = {"num_predict": 2}
        assert c.post("/api/chat", json=body).status_code == 200
    assert [r.params.max_tokens for r in eng.requests] == [7, 7, 3, 7, 2]


def test_content_parts_and_roles(client: TestClient, eng: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "c"},
    ]
    r = client.post("/v1/chat/completions", json={"model": FAKE_MODEL, "messages": messages})
    assert r.status_code == 200
    text = eng.models[FAKE_MODEL].tokenizer.decode(eng.requests[0].prompt_token_ids)
    assert text == "<system>be brief\n<user>a\nb\n<assistant>\n<user>c\n<assistant>"


def test_n_choices_have_distinct_ids_and_seeds(client: TestClient, eng: FakeEngine) -> None:
    r = chat(client, n=3, seed=10)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [q.params.seed for q in eng.requests] == [10, 11, 12]
    assert len({q.request_id for q in eng.requests}) == 3
    assert all(q.request_id.startswith(body["id"]) for q in eng.requests)
    assert body["usage"]["completion_tokens"] == 33


def test_chat_logprobs(client: TestClient) -> None:
    r = chat(client, logprobs=True, top_logprobs=2, max_tokens=3)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e", "l"]
    assert content[0]["bytes"] == [72] and len(content[0]["top_logprobs"]) == 2


def test_stop_string_never_in_output(client: TestClient) -> None:
    r = chat(client, stop="wor")
    assert r.json()["choices"][0]["message"]["content"] == "Hello "


def test_cached_tokens_reported(client: TestClient, eng: FakeEngine) -> None:
    eng.script = Script(cached_tokens=4)
    assert chat(client).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_completions_string_and_token_prompts(client: TestClient, eng: FakeEngine) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": FAKE_MODEL, "prompt": ["ab", "cd"], "n": 2, "max_tokens": 2},
    )
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["He"] * 4
    tok = eng.models[FAKE_MODEL].tokenizer
    assert eng.requests[0].prompt_token_ids == tok.encode("ab") and eng.requests[
        2
    ].prompt_token_ids == tok.encode("cd")
    r = client.post(
        "/v1/completions", json={"model": FAKE_MODEL, "prompt": [[5, 6], [7]], "max_tokens": 1}
    )
    assert r.status_code == 200 and [q.prompt_token_ids for q in eng.requests[4:]] == [[5, 6], [7]]
    r = client.post(
        "/v1/completions", json={"model": FAKE_MODEL, "prompt": [70, 71], "max_tokens": 1}
    )
    assert r.status_code == 200 and eng.requests[-1].prompt_token_ids == [70, 71]


def test_completions_echo_and_logprobs(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": FAKE_MODEL, "prompt": "ab", "echo": True, "logprobs": 1, "max_tokens": 2},
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == "abHe"
    assert choice["logprobs"]["tokens"][-2:] == ["H", "e"]
    assert choice["logprobs"]["text_offset"][-2:] == [2, 3]


def test_max_tokens_zero_without_scoring_skips_engine(client: TestClient, eng: FakeEngine) -> None:
    r = client.post(
        "/v1/completions", json={"model": FAKE_MODEL, "prompt": "ab", "max_tokens": 0, "echo": True}
    )
    assert r.json()["choices"][0] == {
        "index": 0,
        "text": "ab",
        "logprobs": None,
        "finish_reason": "length",
    }
    assert eng.requests == []


def test_echo_logprobs_max_tokens_zero_asks_engine_to_score(
    client: TestClient, eng: FakeEngine
) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": FAKE_MODEL, "prompt": "ab", "max_tokens": 0, "echo": True, "logprobs": 0},
    )
    assert r.status_code == 200
    assert eng.requests[0].params.prompt_logprobs and eng.requests[0].params.max_tokens == 0


def test_models_list_and_retrieve(client: TestClient, eng: FakeEngine) -> None:
    eng.add_model("org/repo:q4")
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [FAKE_MODEL, "org/repo:q4"]
    m = client.get("/v1/models/org/repo:q4").json()
    assert m["owned_by"] == "mlxd" and m["created"] == 1_700_000_000
    assert m["mlxd"]["context_length"] == 256 and m["mlxd"]["loaded"] is False


def test_finish_reason_length_from_engine(client: TestClient, eng: FakeEngine) -> None:
    eng.script = Script(text="abc", finish_reason=FinishReason.LENGTH)
    assert chat(client).json()["choices"][0]["finish_reason"] == "length"


def test_usage_counts_reasoning_tokens() -> None:
    eng = FakeEngine(Script(text="4.", reasoning="2+2?"))
    with TestClient(make_app(eng)) as c:
        body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "2+2"}]}
        usage = c.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 4}
