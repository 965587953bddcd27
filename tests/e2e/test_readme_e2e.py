"""The README's curl example, run verbatim against the real server (only the port differs)."""

import json
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_curl(endpoint: str) -> str:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    for block in blocks:
        if block.startswith(f"curl http://127.0.0.1:11434{endpoint}"):
            return block.strip()
    raise AssertionError(f"no curl example for {endpoint} in the README")


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
