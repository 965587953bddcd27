"""Hostile input over HTTP (FakeEngine, which runs the engine's own token-id check).

Property tests send random token ids, nesting, negatives and the vocabulary edge on every route
that takes ids; the rest walks issue 17's table and the limits: each gets a 4xx in its API's
shape, never a 500. Server-side paths for /api/create and the blob upload flow are here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine  # noqa: F401  (BLAS preload before anything imports mlx)
from tests.server.fake_engine import FAKE_MODEL, FAKE_VOCAB, FakeEngine, Script, make_app

EXAMPLES = int(os.environ.get("MLXD_FUZZ_EXAMPLES", "40"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
IDS = st.one_of(
    st.integers(0, 200),
    st.integers(-3, 3),
    st.integers(FAKE_VOCAB - 3, FAKE_VOCAB + 3),
    st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64, -(2**63), 99999999]),
)
SCHEMA_MAX = 2**31 - 1  # completions' prompt ids are bounded in the schema before the engine


@pytest.fixture(scope="module")
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def client(eng: FakeEngine, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "imports").mkdir()
    app = make_app(eng, models_dir=root / "models", import_dirs=[str(root / "imports")])
    with TestClient(app, raise_server_exceptions=False) as c:
        c.root = root  # type: ignore[attr-defined]
        yield c


def ok_ids(ids: list[int], top: int = FAKE_VOCAB) -> bool:
    return all(0 <= i < top for i in ids)


def openai_400(r, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    return err


def ollama_4xx(r, status: int = 400) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


# --- token ids on every route that takes them ------------------------------------------------


@PROPS
@given(prompt=st.one_of(st.lists(IDS, min_size=1, max_size=6), st.lists(st.lists(IDS, min_size=1, max_size=4), min_size=1, max_size=3)))  # fmt: skip
def test_completion_prompt_ids(client: TestClient, prompt: list) -> None:
    body = {"model": FAKE_MODEL, "prompt": prompt, "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    flat = [i for p in prompt for i in (p if isinstance(p, list) else [p])]
    if ok_ids(flat):
        assert r.status_code == 200, r.text
    else:
        openai_400(r, "prompt")


@PROPS
@given(inputs=st.one_of(st.lists(IDS, min_size=1, max_size=6), st.lists(st.lists(IDS, min_size=1, max_size=4), min_size=1, max_size=3)))  # fmt: skip
def test_embedding_input_ids(client: TestClient, inputs: list) -> None:
    r = client.post("/v1/embeddings", json={"model": FAKE_MODEL, "input": inputs})
    flat = [i for p in inputs for i in (p if isinstance(p, list) else [p])]
    if ok_ids(flat):
        assert r.status_code == 200 and len(r.json()["data"]) >= 1
    else:
        openai_400(r, "input")


@PROPS
@given(context=st.lists(IDS, min_size=1, max_size=6))
def test_ollama_context_ids(client: TestClient, context: list[int]) -> None:
    body = {"model": FAKE_MODEL, "context": context, "stream": False, "options": {"num_predict": 2}}
    r = client.post("/api/generate", json=body)
    if ok_ids(context):
        assert r.status_code == 200 and r.json()["done"]
    else:
        assert "token id" in ollama_4xx(r)


@PROPS
@given(keys=st.lists(st.one_of(IDS.map(str), st.text(max_size=5)), min_size=1, max_size=4))
def test_logit_bias_keys(client: TestClient, keys: list[str]) -> None:
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "logit_bias": {k: 1 for k in keys},
    }
    r = client.post("/v1/chat/completions", json=body)
    valid = all(k.isascii() and k.isdigit() and len(k) <= 10 and int(k) < FAKE_VOCAB for k in keys)
    if valid:
        assert r.status_code == 200, r.text
    else:
        openai_400(r, "logit_bias")


@PROPS
@given(seed=st.one_of(st.integers(-(2**64), 2**65), st.sampled_from([-1, 2**64, 2**64 - 1])))
def test_seed_range(client: TestClient, seed: int) -> None:
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}], "seed": seed}
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 1})
    if -(2**63) <= seed < 2**64:
        assert r.status_code == 200, r.text
    else:
        openai_400(r, "seed")


@PROPS
@given(text=st.text(max_size=8), where=st.sampled_from(["content", "stop", "user", "model"]))
def test_any_text_is_never_a_500(client: TestClient, text: str, where: str) -> None:
    body: dict = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 1,
    }
    if where == "content":
        body["messages"][0]["content"] = text
    else:
        body[where] = text
    raw = json.dumps(body)  # ensure_ascii: lone surrogates travel as \ud800 escapes
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, r.text


# --- the table, and the limits -----------------------------------------------------------

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/chat/completions", '{"model":"%s","messages":[{"role":"user","content":"\\ud800"}]}', "messages[0].content"),
        ("/v1/chat/completions", '{"model":"%s","messages":[{"role":"user","content":"a"}],"stop":["\\udfff"]}', "stop[0]"),
        ("/v1/completions", '{"model":"%s","prompt":"x\\ud800"}', "prompt"),
        ("/v1/embeddings", '{"model":"%s","input":["\\ud800"]}', "input[0]"),
    ],
)  # fmt: skip
def test_lone_surrogates_name_the_field(
    client: TestClient, path: str, raw: str, param: str
) -> None:
    r = client.post(path, content=raw % FAKE_MODEL, headers={"content-type": "application/json"})
    assert "surrogate" in openai_400(r, param)["message"]


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_lone_surrogates_ollama(client: TestClient, path: str) -> None:
    raw = '{"model":"%s","prompt":"\\ud800","messages":[{"role":"user","content":"\\ud800"}]}'
    r = client.post(path, content=raw % FAKE_MODEL)
    assert "surrogate" in ollama_4xx(r)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed"])
def test_embedding_inputs_are_bounded(client: TestClient, path: str) -> None:
    r = client.post(path, json={"model": FAKE_MODEL, "input": ["a"] * 2049})
    assert r.status_code == 400 and "2048" in r.text
    assert client.post(path, json={"model": FAKE_MODEL, "input": ["a"] * 2048}).status_code == 200


def test_nul_is_text(client: TestClient) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "a\u0000b"}], "stop": ["\u0000"]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    body = {"model": FAKE_MODEL, "prompt": "a\u0000b", "stream": False}
    assert client.post("/api/generate", json=body).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 10**30}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 10**6}, "n"),
        ({"temperature": 1e308}, "temperature"),
        ({"top_k": 10**30}, None),
        ({"top_logprobs": 10**9, "logprobs": True}, "top_logprobs"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"messages": []}, "messages"),
        ({"stop": ["s"] * 10_000}, "stop"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"logit_bias": {"-1": 5}}, "logit_bias"),
        ({"logit_bias": {"1.5": 5}}, "logit_bias"),
    ],
)
def test_openai_limits(client: TestClient, extra: dict, param: str | None) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    if param is None:
        assert r.status_code == 200, r.text
    else:
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["param"] in (param, None) or r.json()["error"]["param"].startswith(
            param
        )


@pytest.mark.parametrize(
    "raw",
    ['{"model":"m","x":NaN}', '{"model":"m","x":1e999}', '{"a":' + "1" * 5000 + "}", '{"a":' + "[" * 50_000 + "}"],
)  # fmt: skip
def test_json_numbers_and_depth(client: TestClient, raw: str) -> None:
    for path in ("/v1/chat/completions", "/api/chat"):
        r = client.post(path, content=raw)
        assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "options",
    [
        {"num_ctx": "abc"},
        {"num_ctx": -5},
        {"num_predict": "x"},
        {"num_ctx": 1.5},
        {"temperature": "hot"},
        {"seed": 2**64},
        {"top_k": True},
        {"stop": [1, 2]},
        {"repeat_last_n": 10**30},
    ],
)
def test_ollama_options_limits(client: TestClient, options: dict) -> None:
    body = {"model": FAKE_MODEL, "prompt": "hi", "stream": False, "options": options}
    ollama_4xx(client.post("/api/generate", json=body))


@pytest.mark.parametrize(
    "options",
    [{"num_ctx": 10**15}, {"num_predict": 10**15}, {"top_k": 10**15}, {"seed": -1}, {"seed": 2**64 - 1}, {"repeat_last_n": 10**12}],
)  # fmt: skip
def test_ollama_options_at_their_limits_run(client: TestClient, options: dict) -> None:
    body = {"model": FAKE_MODEL, "prompt": "hi", "stream": False, "options": options}
    assert client.post("/api/generate", json=body).status_code == 200


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(1e300, -1.0), ("99999999999h", -1.0), (2**63, -1.0), ("5m", 300.0), ("nan", None), ("inf", None), ("1e400", None)],
)  # fmt: skip
def test_keep_alive_at_its_limits(value: object, seconds: float | None) -> None:
    """A keep_alive past any date is forever (an expiry must stay a date /api/ps can print)."""
    from server.ollama.options import OptionError, parse_keep_alive

    if seconds is None:
        with pytest.raises(OptionError):
            parse_keep_alive(value)
    else:
        assert parse_keep_alive(value) == seconds


def test_table_token_ids(client: TestClient) -> None:
    openai_400(client.post("/v1/completions", json={"model": FAKE_MODEL, "prompt": [1, 2, FAKE_VOCAB]}), "prompt")  # fmt: skip
    body = {"model": FAKE_MODEL, "prompt": [[1, 2], [3, 99999999 + FAKE_VOCAB]]}
    openai_400(client.post("/v1/completions", json=body), "prompt")
    openai_400(
        client.post("/v1/embeddings", json={"model": FAKE_MODEL, "input": [[-3, 2]]}), "input"
    )
    body = {"model": FAKE_MODEL, "context": [1, FAKE_VOCAB], "stream": False}
    ollama_4xx(client.post("/api/generate", json=body))
    body = {"model": FAKE_MODEL, "input": [1, 2, FAKE_VOCAB]}
    openai_400(client.post("/v1/embeddings", json=body), "input")
    # Counted as requests refused before running, not as engine failures.
    assert 'mlxd_rejections_total{reason="invalid"}' in client.get("/metrics").text


# --- 500s are ours, logged with the request id ---------------------------------------------------


def test_a_500_logs_its_stack_trace_with_the_request_id(
    eng: FakeEngine, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    eng.script = Script(reject=RuntimeError("a bug of ours"))
    try:
        with caplog.at_level(logging.ERROR, logger="mlxd.server"):
            r = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "rid-42"})
    finally:
        eng.script = Script()
    assert r.status_code == 500 and r.headers["x-request-id"] == "rid-42"
    assert "a bug of ours" not in r.text
    rec = [x for x in caplog.records if "rid-42" in x.getMessage()]
    assert rec and rec[0].exc_info is not None and "a bug of ours" in str(rec[0].exc_info[1])


# --- /api/create and blobs -------------------------------------------------------------------------


def test_create_from_a_server_path_outside_import_dirs_is_403_and_says_nothing(
    client: TestClient, tmp_path: Path
) -> None:
    real = tmp_path / "exists.gguf"
    real.write_bytes(b"GGUF")
    answers = []
    for source in (str(real), str(tmp_path / "missing.gguf"), "/etc/passwd", "../../etc/passwd"):
        r = client.post("/api/create", json={"model": "x:1", "from": source, "stream": False})
        answers.append((r.status_code, r.json()))
    assert answers[0][0] == 403 and all(a == answers[0] for a in answers)
    assert "exists" not in answers[0][1]["error"]


def test_create_inside_import_dirs_and_symlinks_out(client: TestClient, eng: FakeEngine) -> None:
    imports = client.root / "imports"  # type: ignore[attr-defined]
    (imports / "m.gguf").write_bytes(b"GGUF")
    r = client.post("/api/create", json={"model": "in:1", "from": str(imports / "m.gguf"), "stream": False})  # fmt: skip
    assert r.status_code == 200 and "in:1" in eng.models
    (imports / "out.gguf").symlink_to("/etc/hostname")
    r = client.post("/api/create", json={"model": "out:1", "from": str(imports / "out.gguf"), "stream": False})  # fmt: skip
    ollama_4xx(r, 403)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_blob_upload_and_create_from_files(client: TestClient, eng: FakeEngine) -> None:
    data = b"GGUF" + os.urandom(64)
    digest = _digest(data)
    assert client.head(f"/api/blobs/{digest}").status_code == 404
    ollama_4xx(client.post(f"/api/blobs/{digest}", content=data + b"x"))  # digest mismatch
    assert client.head(f"/api/blobs/{digest}").status_code == 404
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert client.head(f"/api/blobs/{digest}").status_code == 200
    r = client.post("/api/create", json={"model": "up:1", "files": {"m.gguf": digest}, "stream": False})  # fmt: skip
    assert r.status_code == 200 and "up:1" in eng.models
    # Imported: the blob is gone (the model has its own copy); a client uploads it again.
    assert client.head(f"/api/blobs/{digest}").status_code == 404
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
    cfg = _digest(b"{}")
    assert client.post(f"/api/blobs/{cfg}", content=b"{}").status_code == 201
    files = {"config.json": cfg, "model.safetensors": digest}
    r = client.post("/api/create", json={"model": "dir:1", "files": files, "stream": False})
    assert r.status_code == 200 and "dir:1" in eng.models
    assert client.head(f"/api/blobs/{cfg}").status_code == 404
    blobs = client.root / "models" / ".blobs"  # type: ignore[attr-defined]
    assert [p.name for p in blobs.iterdir()] == []  # no upload, stage or blob left behind


def test_blobs_stay_for_a_retry_and_for_other_pending_creates(
    client: TestClient, eng: FakeEngine
) -> None:
    from server.ollama.blobs import PENDING, blob_path

    data = b"GGUF" + os.urandom(64)
    digest = _digest(data)
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
    body = {"model": "up:1", "files": {"m.gguf": digest}, "stream": False}
    real = eng.import_gguf

    async def failing(*args, **kwargs):
        raise ValueError("not a GGUF file")

    eng.import_gguf = failing  # type: ignore[method-assign]
    assert client.post("/api/create", json=body).status_code >= 400
    assert client.head(f"/api/blobs/{digest}").status_code == 200  # kept for a retry
    eng.import_gguf = real  # type: ignore[method-assign]
    path = {blob_path(client.root / "models", digest)}  # type: ignore[attr-defined]
    PENDING.hold(path)  # another create reading the same blob is in progress
    try:
        assert client.post("/api/create", json=body).status_code == 200
        assert client.head(f"/api/blobs/{digest}").status_code == 200
    finally:
        PENDING.release(path, imported=True)  # that one is over too: now it goes
    assert client.head(f"/api/blobs/{digest}").status_code == 404


@pytest.mark.parametrize(
    "files",
    [
        {"m.gguf": "sha256:" + "0" * 64},  # never uploaded
        {"../m.gguf": "sha256:" + "0" * 64},
        {"m.gguf": "sha256:../../etc/passwd"},
        {"a.bin": "sha256:" + "0" * 64},
    ],
)
def test_create_from_bad_files(client: TestClient, files: dict) -> None:
    ollama_4xx(client.post("/api/create", json={"model": "x:1", "files": files}))


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 64, "sha256:" + "G" * 64, ".."])
def test_blob_digest_format(client: TestClient, digest: str) -> None:
    assert client.post(f"/api/blobs/{digest}", content=b"x").status_code in (400, 404)
