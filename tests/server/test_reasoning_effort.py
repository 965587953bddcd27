"""Reasoning effort from each API (OpenAI's reasoning_effort, Responses' reasoning.effort,
Ollama's think levels) lands on the one OutputSpec the same way, and bad levels are 400s."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from engine.output.events import OutputSpec
from server.chat import Message, chat_text
from server.effort import BUDGETS
from tests.server.fake_engine import FAKE_MODEL, FakeEngine, make_app

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def eng() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(eng: FakeEngine):
    with TestClient(make_app(eng)) as c:
        yield c


def _chat(client: TestClient, effort: Any):
    body = {"model": FAKE_MODEL, "messages": USER, "reasoning_effort": effort}
    return client.post("/v1/chat/completions", json=body)


def _responses(client: TestClient, effort: Any):
    body = {"model": FAKE_MODEL, "input": "hi", "reasoning": {"effort": effort}}
    return client.post("/v1/responses", json=body)


@pytest.mark.parametrize("send", [_chat, _responses])
@pytest.mark.parametrize("effort", ["minimal", "low", "medium", "high"])
def test_a_level_caps_thinking_and_reaches_the_template(client, eng, send, effort):
    assert send(client, effort).status_code == 200
    out = eng.requests[-1].output
    assert out.reasoning and out.reasoning_effort == effort
    assert out.reasoning_budget == BUDGETS[effort]


@pytest.mark.parametrize("send", [_chat, _responses])
def test_none_turns_thinking_off_and_absent_leaves_it_alone(client, eng, send):
    assert send(client, "none").status_code == 200
    assert eng.requests[-1].output.reasoning is False
    assert send(client, None).status_code == 200
    out = eng.requests[-1].output
    assert out.reasoning and out.reasoning_budget is None and out.reasoning_effort is None


@pytest.mark.parametrize(
    ("send", "param"), [(_chat, "reasoning_effort"), (_responses, "reasoning.effort")]
)
@pytest.mark.parametrize("effort", ["extreme", 3, ["low"]])
def test_an_unknown_level_is_a_400_naming_the_field(client, eng, send, param, effort):
    r = send(client, effort)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and "minimal" in error["message"]
    assert eng.requests == []


def test_ollama_think_levels_are_checked(client, eng):
    body = {"model": FAKE_MODEL, "messages": USER}
    r = client.post("/api/chat", json={**body, "think": "banana"})
    assert r.status_code == 400 and "low, medium, high" in r.json()["error"]
    # A real level reaches the thinking check: the fake model has no thinking markers.
    r = client.post("/api/chat", json={**body, "think": "high"})
    assert r.status_code == 400 and "thinking" in r.json()["error"]
    r = client.post("/api/chat", json={**body, "think": "false", "stream": False})
    assert r.status_code == 200 and eng.requests[-1].output.reasoning is False


class _Tok:
    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        self.kwargs = kwargs
        return "prompt"


def test_the_level_is_a_template_variable_unless_thinking_is_off():
    tok = _Tok()
    msgs = [Message("user", "hi")]
    chat_text(tok, "m", msgs, False, OutputSpec(reasoning_effort="low"))
    assert tok.kwargs.get("reasoning_effort") == "low"
    chat_text(tok, "m", msgs, False, OutputSpec(reasoning=False, reasoning_effort="low"))
    assert "reasoning_effort" not in tok.kwargs and tok.kwargs["enable_thinking"] is False
