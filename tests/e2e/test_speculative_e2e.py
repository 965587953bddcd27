"""Speculative decoding on the real default model, through the real server: the same greedy
text with it off and on, and its drafts counted in /metrics."""

import re
from pathlib import Path

import httpx
import pytest

from bench.loadgen import REPEAT_ASK, REPEAT_TEXT

pytestmark = pytest.mark.e2e

ASKS = [
    REPEAT_ASK + REPEAT_TEXT[:400],  # the answer copies the prompt: drafts hold
    "Write one sentence about the sea.",
]


def answers(url: str) -> list[str]:
    out = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for ask in ASKS:
            body = {
                "model": "smollm2:135m",
                "messages": [{"role": "user", "content": ask}],
                "max_tokens": 60,
                "temperature": 0,
            }
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["message"]["content"])
    return out


def counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name}_total (\S+)$", text, flags=re.M)
    assert m, name
    return float(m.group(1))


def test_greedy_text_is_the_same_with_and_without_speculation(smollm2_dir: Path, start_server):
    on = start_server(smollm2_dir.parent, MLXD_SPECULATIVE="on").url
    off = start_server(smollm2_dir.parent, MLXD_SPECULATIVE="off").url
    assert answers(on) == answers(off)
    assert counter(on, "mlxd_spec_accepted_tokens") > 10
    assert counter(off, "mlxd_spec_drafted_tokens") == 0


def sampled_copy(seed: int) -> dict:
    """A seeded T=0.7 request to copy the text."""
    return {
        "model": "smollm2:135m",
        "messages": [{"role": "user", "content": ASKS[0]}],
        "max_tokens": 80,
        "temperature": 0.7,
        "top_p": 0.95,
        "seed": seed,
    }


def stream_text(client, seed: int) -> tuple[str, list[str]]:
    """A seeded T=0.7 copy of the text, streamed: its text and its pieces."""
    stream = client.chat.completions.create(**sampled_copy(seed), stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    return "".join(pieces), pieces


def test_a_sampled_stream_drafts_and_streams_what_it_samples(smollm2_dir: Path, start_server):
    """Seeded T=0.7 requests draft (the copy holds most drafts), stream text equal to the same
    request unstreamed and to speculation off (same seed: each verified position draws with
    the uniform decoding one at a time draws with), nothing duplicated or lost; an Ollama
    request with its default options (repeat_penalty 1.1) drafts too."""
    import ollama
    import openai

    on = start_server(smollm2_dir.parent, MLXD_SPECULATIVE="on").url
    off = start_server(smollm2_dir.parent, MLXD_SPECULATIVE="off").url
    client = openai.OpenAI(base_url=on + "/v1", api_key="none", timeout=300)
    before = counter(on, "mlxd_spec_accepted_tokens")
    text, pieces = stream_text(client, seed=7)
    assert counter(on, "mlxd_spec_accepted_tokens") > before + 10
    assert len([p for p in pieces if p]) > 10 and "lighthouse" in text  # a copy, streamed
    full = client.chat.completions.create(**sampled_copy(7))
    assert full.choices[0].message.content == text  # the same seed: the same text
    plain = openai.OpenAI(base_url=off + "/v1", api_key="none", timeout=300)
    assert stream_text(plain, seed=7)[0] == text
    assert stream_text(client, seed=8)[0] != text  # the seed matters: these are draws
    before = counter(on, "mlxd_spec_drafted_tokens")
    chunks = ollama.Client(host=on, timeout=300).chat(
        model="smollm2:135m",
        messages=[{"role": "user", "content": ASKS[0]}],
        options={"seed": 3, "num_predict": 60},
        stream=True,
    )
    streamed = "".join(c.message.content or "" for c in chunks)
    assert streamed and counter(on, "mlxd_spec_drafted_tokens") > before
