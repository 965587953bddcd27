"""The Ollama API over HTTP against the FakeEngine: shapes, NDJSON framing, errors, Host check."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.errors import QueueFullError
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, Script
from tests.server.fake_engine import make_app as make_fake_app

FINAL_KEYS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


def make_app(eng: FakeEngine, bind_host: str | None = None) -> FastAPI:
    """The real app over the fake engine; bound to `bind_host` (any host by default)."""
    return make_fake_app(eng, host=bind_host or "0.0.0.0")


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng)) as c:
        yield c


def lines(resp) -> list[dict]:
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    raw = resp.text
    assert raw.endswith("\n")
    return [json.loads(line) for line in raw.splitlines() if line]


def user(text: str) -> dict:
    return {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text}]}


def assert_final(obj: dict) -> None:
    assert obj["done"] is True
    for key in FINAL_KEYS:
        assert isinstance(obj[key], int) and obj[key] >= 0, key
    assert obj["total_duration"] > 0


# --- chat / generate ------------------------------------------------------------------------


def test_chat_streams_ndjson_fragments_then_final(client, eng):
    out = lines(client.post("/api/chat", json=user("hi")))
    assert "".join(o["message"]["content"] for o in out) == "Hello world"
    assert all(o["done"] is False for o in out[:-1])
    assert all(o["message"]["role"] == "assistant" for o in out)
    assert out[-1]["done_reason"] == "stop"
    assert_final(out[-1])
    assert out[-1]["eval_count"] == len("Hello world")
    # The prompt went through the model's chat template, without a BOS added on top.
    prompt = eng.requests[0].prompt_token_ids
    assert prompt == eng.models[FAKE_MODEL].tokenizer.encode("<user>hi\n<assistant>", False)
    assert out[-1]["prompt_eval_count"] == len(prompt)


def test_chat_not_streamed_is_one_object(client):
    r = client.post("/api/chat", json={**user("hi"), "stream": False})
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["message"] == {"role": "assistant", "content": "Hello world"}
    assert_final(body)


def test_generate_length_and_context(client, eng):
    body = client.post(
        "/api/generate",
        json={"model": FAKE_MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
    ).json()
    assert body["response"] == "Hel" and body["done_reason"] == "length"
    assert_final(body)
    tok = eng.models[FAKE_MODEL].tokenizer
    assert tok.decode(body["context"]).endswith("<assistant>Hel")
    # Sending the context back continues from it.
    client.post(
        "/api/generate",
        json={"model": FAKE_MODEL, "prompt": "more", "context": body["context"], "stream": False},
    )
    assert eng.requests[1].prompt_token_ids[: len(body["context"])] == body["context"]


def test_generate_raw_and_base_model_prompts(client, eng):
    eng.add_model("base:latest", chat_template=None)
    client.post("/api/generate", json={"model": FAKE_MODEL, "prompt": "[INST]x", "raw": True})
    raw = client.post(
        "/api/generate",
        json={"model": "base:latest", "prompt": "once", "system": "S", "stream": False},
    ).json()
    tok = eng.models[FAKE_MODEL].tokenizer
    assert eng.requests[0].prompt_token_ids == tok.encode("[INST]x")
    assert eng.requests[1].prompt_token_ids == tok.encode("S\n\nonce")
    assert "context" in raw


def test_options_reach_sampling_params(client, eng):
    options = {"temperature": 0.1, "top_k": 3, "seed": 9, "stop": ["wor"], "repeat_penalty": 1.5}
    body = client.post("/api/chat", json={**user("x"), "options": options, "stream": False}).json()
    p = eng.requests[0].params
    assert (p.temperature, p.top_k, p.seed, p.stop, p.repetition_penalty) == (
        0.1,
        3,
        9,
        ["wor"],
        1.5,
    )
    assert body["message"]["content"] == "Hello "
    assert eng.requests[0].params.max_tokens == 256 - len(eng.requests[0].prompt_token_ids)


def test_keep_alive_reaches_the_engine(client, eng):
    client.post("/api/chat", json={**user("x"), "keep_alive": "10m"})
    client.post("/api/chat", json={**user("x"), "keep_alive": -1})
    assert [r.keep_alive for r in eng.requests] == [600.0, -1.0]
    r = client.post("/api/chat", json={**user("x"), "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_empty_messages_load_and_keep_alive_zero_unloads(client, eng):
    body = client.post("/api/chat", json={"model": FAKE_MODEL, "messages": []}).json()
    assert body["done_reason"] == "load" and body["done"] is True
    assert body["message"] == {"role": "assistant", "content": ""}
    assert [m["name"] for m in client.get("/api/ps").json()["models"]] == [FAKE_MODEL]
    body = client.post("/api/generate", json={"model": FAKE_MODEL, "keep_alive": 0}).json()
    assert body["done_reason"] == "unload" and body["response"] == ""
    assert client.get("/api/ps").json()["models"] == []
    assert eng.requests == []


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"format": "yaml"}, "format"),
        ({"format": {"type": "strin"}}, "format"),
        ({"tools": [{"type": "function", "function": {"description": "f"}}]}, "tools[0]"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
            '"not"',
        ),
        ({"think": True}, "thinking"),  # the fake model has no thinking markers
    ],
)
def test_bad_structured_input_is_400(client, extra, fragment):
    r = client.post("/api/chat", json={**user("x"), **extra})
    assert r.status_code == 400
    assert fragment in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "nope:latest", "messages": [{"role": "user", "content": "x"}]}, 404),
        ({"messages": [{"role": "user", "content": "x"}]}, 400),
        ({"model": FAKE_MODEL, "messages": "x"}, 400),
        ({"model": FAKE_MODEL, "messages": [{"content": "x"}]}, 400),
        ({**user("x"), "options": {"temperature": -2}}, 400),
        ({**user("x"), "stream": "false"}, 400),  # Go's decoder refuses a string for a bool
        ({**user("x"), "truncate": "yes"}, 400),
        ({**user("x"), "shift": 1}, 400),
    ],
)
def test_request_errors_have_ollama_shape(client, body, status):
    r = client.post("/api/chat", json=body)
    assert r.status_code == status
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)


def test_null_fields_keep_their_defaults(client):
    # As Go's decoder: a JSON null leaves the field unset (stream stays true, content empty).
    body = {**user("x"), "stream": None, "truncate": None, "options": None, "format": None}
    assert (
        client.post("/api/chat", json=body)
        .headers["content-type"]
        .startswith("application/x-ndjson")
    )
    msgs = [{"role": "user", "content": None}]
    r = client.post("/api/chat", json={"model": FAKE_MODEL, "messages": msgs, "stream": False})
    assert r.status_code == 200, r.text
    r = client.post("/api/generate", json={"model": FAKE_MODEL, "prompt": "x", "raw": None})
    assert r.status_code == 200, r.text


def test_bad_json_and_empty_body(client):
    assert client.post("/api/generate", content=b"{oops").status_code == 400
    r = client.post("/api/generate", content=b"")
    assert r.status_code == 400 and r.json() == {"error": "missing request body"}


def test_engine_rejection_keeps_its_status(client, eng):
    eng.script = Script(reject=QueueFullError("queue full"))
    r = client.post("/api/chat", json=user("x"))
    assert r.status_code == 429 and r.json() == {"error": "queue full"}
    assert "Retry-After" in r.headers


def test_error_mid_stream_is_the_last_line(client, eng):
    eng.script = Script(text="abcdef", error_after=3, error_message="boom")
    out = lines(client.post("/api/chat", json=user("x")))
    assert [o["message"]["content"] for o in out[:-1]] == ["a", "b", "c"]
    assert out[-1] == {"error": "boom"}


def test_context_overflow_is_truncated_or_400(client, eng):
    eng.add_model("tiny:latest", context_length=8)
    body = {"model": "tiny:latest", "prompt": "far too long a prompt", "stream": False}
    r = client.post("/api/generate", json=body)  # Ollama cuts it (server/truncation.py)
    assert r.status_code == 200 and r.json()["prompt_eval_count"] < 8
    r = client.post("/api/generate", json={**body, "truncate": False})
    assert r.status_code == 400 and "context length" in r.json()["error"]


# --- model management -----------------------------------------------------------------------


def test_tags_shape(client):
    models = client.get("/api/tags").json()["models"]
    m = models[0]
    assert m["name"] == m["model"] == FAKE_MODEL
    assert m["size"] == 4_000_000 and len(m["digest"]) == 64
    assert m["modified_at"].endswith("Z")
    assert set(m["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
    assert m["details"]["parameter_size"] == "1M"


def test_ps_shape_after_use(client):
    assert client.get("/api/ps").json() == {"models": []}
    client.post("/api/chat", json=user("x"))
    (m,) = client.get("/api/ps").json()["models"]
    assert m["name"] == FAKE_MODEL and m["size"] == 4_000_000
    assert {"size_vram", "expires_at", "details", "context_length"} <= set(m)


def test_show(client):
    assert client.post("/api/show", json={"model": "nope"}).status_code == 404
    body = client.post("/api/show", json={"model": FAKE_MODEL}).json()
    assert body["details"]["family"] == "llama"
    assert body["model_info"]["general.architecture"] == "llama"
    assert body["model_info"]["llama.context_length"] == 256
    assert isinstance(body["parameters"], str) and "template" in body
    client.post("/api/chat", json={"model": FAKE_MODEL, "messages": []})  # loaded: template known
    assert "messages" in client.post("/api/show", json={"name": FAKE_MODEL}).json()["template"]


def test_pull_streams_progress(client, eng):
    out = lines(client.post("/api/pull", json={"model": "new:1"}))
    assert out[0] == {"status": "pulling manifest"}
    assert [o["completed"] for o in out if "completed" in o] == [0, 50, 100]
    assert all(o["total"] == 100 for o in out if "total" in o)
    assert out[-1] == {"status": "success"}
    assert "new:1" in eng.models
    assert client.post("/api/pull", json={"model": "b:1", "stream": False}).json() == {
        "status": "success"
    }


def test_create_from_gguf_file_folder_and_model(client, eng, tmp_path):
    client.app.state.settings.import_dirs = [str(tmp_path)]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = lines(client.post("/api/create", json={"model": "g:1", "from": str(gguf)}))
    assert out[0]["status"] == "parsing GGUF" and out[-1] == {"status": "success"}
    assert any(o.get("total") == 1 for o in out)
    r = client.post("/api/create", json={"model": "f:1", "from": str(tmp_path), "stream": False})
    assert r.json() == {"status": "success"}
    r = client.post("/api/create", json={"model": "c:1", "modelfile": f"FROM {FAKE_MODEL}\n"})
    assert lines(r)[-1] == {"status": "success"}
    assert {"g:1", "f:1", "c:1"} <= set(eng.models)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "x:1"}, 400),
        ({"model": "x:1", "from": "/no/such/file.gguf"}, 403),  # outside import_dirs
        ({"model": "x:1", "from": "unknown-model"}, 404),
        ({"model": "x:1", "from": FAKE_MODEL, "quantize": "q4_K_M"}, 400),
        ({"model": "x:1", "files": {"a.gguf": "sha256:00"}}, 400),
        ({"model": "x:1", "modelfile": f"FROM {FAKE_MODEL}\nSYSTEM hi"}, 400),
    ],
)
def test_create_errors(client, body, status):
    r = client.post("/api/create", json=body)
    assert r.status_code == status and "error" in r.json()


def test_copy_and_delete(client, eng):
    r = client.post("/api/copy", json={"source": FAKE_MODEL, "destination": "copy:1"})
    assert r.status_code == 200 and "copy:1" in eng.models
    assert client.post("/api/copy", json={"source": "nope", "destination": "d"}).status_code == 404
    assert client.request("DELETE", "/api/delete", json={"model": "copy:1"}).status_code == 200
    assert "copy:1" not in eng.models
    r = client.request("DELETE", "/api/delete", json={"model": "copy:1"})
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_version(client):
    # GET / ("Ollama is running") lives with the chat page: tests/server/test_webui.py
    assert isinstance(client.get("/api/version").json()["version"], str)


# --- embeddings -----------------------------------------------------------------------------


def test_embed_shapes(client):
    body = client.post("/api/embed", json={"model": FAKE_MODEL, "input": ["a", "bb"]}).json()
    assert len(body["embeddings"]) == 2
    for vec in body["embeddings"]:
        assert abs(sum(v * v for v in vec) - 1.0) < 1e-6
    assert body["prompt_eval_count"] == 5  # BOS + 1, BOS + 2
    assert isinstance(body["total_duration"], int)
    short = client.post(
        "/api/embed", json={"model": FAKE_MODEL, "input": "a", "dimensions": 2}
    ).json()
    assert len(short["embeddings"][0]) == 2
    legacy = client.post("/api/embeddings", json={"model": FAKE_MODEL, "prompt": "a"}).json()
    assert legacy["embedding"] == body["embeddings"][0]


def test_embed_truncation(client, eng):
    eng.add_model("tiny:latest", context_length=4)
    ok = client.post("/api/embed", json={"model": "tiny:latest", "input": "abcdefgh"})
    assert ok.status_code == 200
    r = client.post(
        "/api/embed", json={"model": "tiny:latest", "input": "abcdefgh", "truncate": False}
    )
    assert r.status_code == 400


def test_openai_embeddings(client):
    body = client.post("/v1/embeddings", json={"model": FAKE_MODEL, "input": ["a", "b"]}).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 4
    b64 = client.post(
        "/v1/embeddings", json={"model": FAKE_MODEL, "input": [5, 6], "encoding_format": "base64"}
    ).json()
    assert isinstance(b64["data"][0]["embedding"], str)
    err = client.post("/v1/embeddings", json={"model": FAKE_MODEL, "input": 3})
    assert err.status_code == 400 and "message" in err.json()["error"]  # OpenAI's shape


# --- Host check -----------------------------------------------------------------------------


def test_host_check_refuses_foreign_hosts(eng):
    with TestClient(make_app(eng, bind_host="127.0.0.1"), base_url="http://localhost:11434") as c:
        assert c.get("/api/tags").status_code == 200
        r = c.get("/api/tags", headers={"Host": "evil.example.com"})
        assert r.status_code == 403 and "error" in r.json()
        assert c.get("/api/version", headers={"Host": "127.0.0.1:11434"}).status_code == 200
