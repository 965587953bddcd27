"""The README's curl examples, run verbatim against the real server (only the port differs)."""

import json
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_curls(endpoint: str) -> list[str]:
    """Every README shell block that is one curl command to exactly `endpoint`."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    pattern = re.compile(rf"curl (-N )?http://127\.0\.0\.1:11434{re.escape(endpoint)}\s")
    found = [b.strip() for b in blocks if pattern.match(b)]
    assert found, f"no curl example for {endpoint} in the README"
    return found


def readme_curl(endpoint: str) -> str:
    return readme_curls(endpoint)[0]


def run(cmd: str, live_server: str) -> str:
    cmd = cmd.replace("http://127.0.0.1:11434", live_server)
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_readme_chat_example_answers(live_server: str):
    cmd = readme_curl("/v1/chat/completions").replace("http://127.0.0.1:11434", live_server)
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    answer = body["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_readme_ollama_examples_answer(live_server: str):
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    lines = [
        ln
        for b in blocks
        for ln in b.splitlines()
        if ln.startswith("curl http://127.0.0.1:11434/api/generate")
    ]
    assert lines, "no /api/generate example in the README"
    cmd = lines[0].replace("http://127.0.0.1:11434", live_server)
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    body = json.loads(out.stdout)
    assert body["done"] is True and body["response"].strip()


def test_readme_anthropic_examples_answer(live_server: str):
    msg = json.loads(run(readme_curl("/v1/messages"), live_server))
    assert msg["type"] == "message" and "Paris" in msg["content"][0]["text"]
    assert msg["stop_reason"] in ("end_turn", "max_tokens")
    counted = json.loads(run(readme_curl("/v1/messages/count_tokens"), live_server))
    assert counted["input_tokens"] > 5


def test_readme_responses_examples_answer(live_server: str):
    plain, streamed = readme_curls("/v1/responses")
    resp = json.loads(run(plain, live_server))
    assert resp["object"] == "response" and "Paris" in resp["output"][0]["content"][0]["text"]
    lines = run(streamed, live_server).splitlines()
    assert lines[0] == "event: response.created"
    kinds = [ln[len("event: ") :] for ln in lines if ln.startswith("event: ")]
    data = [json.loads(ln[len("data: ") :]) for ln in lines if ln.startswith("data: ")]
    assert [d["type"] for d in data] == kinds
    assert "response.output_text.delta" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
