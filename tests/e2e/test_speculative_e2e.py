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
