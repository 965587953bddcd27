"""The official `ollama` client against the real server and the real SmolLM2-135M."""

from __future__ import annotations

import pytest

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.e2e
MODEL = "smollm2:135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server: str):
    return ollama.Client(host=live_server)


def _names(listing) -> set[str]:
    return {m.model for m in listing.models}


def test_chat_not_streamed(client):
    r = client.chat(model=MODEL, messages=QUESTION, options={"temperature": 0, "num_predict": 32})
    assert "Paris" in r.message.content
    assert r.done and r.done_reason in ("stop", "length")
    assert r.eval_count > 0 and r.eval_duration > 0 and r.prompt_eval_count > 0
    assert r.total_duration >= r.eval_duration


def test_chat_streamed(client):
    parts = list(
        client.chat(
            model=MODEL,
            messages=QUESTION,
            stream=True,
            options={"temperature": 0, "num_predict": 32},
        )
    )
    assert len(parts) > 2 and parts[-1].done and not parts[0].done
    assert "Paris" in "".join(p.message.content or "" for p in parts)


def test_long_chat_is_truncated_to_num_ctx(client):
    # Ollama drops the oldest turns rather than refusing: the latest question is still answered.
    old = [
        {"role": r, "content": f"Turn {i}: let us talk about gardening and tomatoes for a while."}
        for i in range(30)
        for r in ("user", "assistant")
    ]
    options = {"temperature": 0, "num_predict": 16, "num_ctx": 160}
    r = client.chat(model=MODEL, messages=old + QUESTION, options=options)
    assert r.done and "Paris" in r.message.content
    assert r.prompt_eval_count + r.eval_count <= 160


def test_generate(client):
    r = client.generate(
        model=MODEL, prompt="The capital of France is", options={"temperature": 0, "num_predict": 8}
    )
    assert r.response and r.done and r.context


def test_list_show_and_ps(client):
    assert MODEL in _names(client.list())
    info = client.show(MODEL)
    assert info.details.family and info.modelinfo["general.architecture"]
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 1})
    assert MODEL in _names(client.ps())


def test_create_copy_delete(client):
    from models.default import bundled_gguf

    gguf = bundled_gguf(MODEL)
    assert gguf is not None
    name, copy = "e2e-created:latest", "e2e-copied:latest"
    try:
        # As Ollama's own CLI does it: upload the file as a blob, create from its digest.
        digest = client.create_blob(gguf)
        done = list(client.create(model=name, files={"model.gguf": digest}, stream=True))
        assert done[-1].status == "success"
        assert name in _names(client.list())
        client.copy(name, copy)
        assert copy in _names(client.list())
        r = client.chat(
            model=copy, messages=QUESTION, options={"temperature": 0, "num_predict": 24}
        )
        assert r.message.content
    finally:
        for n in (copy, name):
            try:
                client.delete(n)
            except ollama.ResponseError:
                pass
    assert not {name, copy} & _names(client.list())
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(name)
    assert e.value.status_code == 404


def test_embed(client):
    """Unit vectors whose similarity means something: a paraphrase scores closer than an
    unrelated sentence."""
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue grew by eight percent.",
    ]
    r = client.embed(model=MODEL, input=texts)
    assert len(r.embeddings) == 3
    for vec in r.embeddings:
        assert abs(sum(v * v for v in vec) - 1.0) < 1e-3
    cat, paraphrase, revenue = r.embeddings
    similar = sum(a * b for a, b in zip(cat, paraphrase))
    unrelated = sum(a * b for a, b in zip(cat, revenue))
    assert similar > unrelated, (similar, unrelated)


def test_keep_alive_zero_unloads(client):
    client.generate(model=MODEL, prompt="hi", options={"num_predict": 1}, keep_alive="5m")
    assert MODEL in _names(client.ps())
    r = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert r.done_reason == "unload"
    assert MODEL not in _names(client.ps())
    r = client.chat(model=MODEL, messages=[])
    assert r.done_reason == "load"
    assert MODEL in _names(client.ps())


def test_unknown_model_is_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model:1", messages=QUESTION)
    assert e.value.status_code == 404


def test_create_from_a_server_path_is_refused(client):
    for path in ("/etc/passwd", "/no/such/file.gguf"):
        with pytest.raises(ollama.ResponseError) as e:
            client.create(model="evil:1", from_=path)
        assert e.value.status_code == 403 and "import_dirs" in str(e.value)
