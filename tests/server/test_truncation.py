"""Ollama's prompt truncation (server/truncation.py): which messages and tokens a too-long prompt
keeps, and the /api/chat and /api/generate behaviour over the fake engine."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from server.truncation import fit_messages, keep_head_and_tail, kept_messages
from tests.server.fake_engine import BOS_ID, OFFSET, FakeEngine, make_app


@dataclass
class Msg:
    role: str
    content: str


def render(messages: list[Msg]) -> list[int]:
    """One token per character, as the fake tokenizer: lengths are easy to reason about."""
    return [BOS_ID] + [ord(c) for m in messages for c in f"<{m.role}>{m.content}\n"]


def brute_force(messages: list[Msg], limit: int) -> list[int]:
    """The first start (from the oldest) whose prompt fits, by trying every one."""
    for i in range(len(messages)):
        start = i
        if messages[i].role == "tool" and i > 0:
            while start > 0 and messages[start - 1].role == "tool":
                start -= 1
            start = start - 1 if messages[start - 1].role == "assistant" else i
        ids = render(kept_messages(messages, start))
        if len(ids) <= limit:
            return ids
    return render(kept_messages(messages, len(messages) - 1))


def test_nothing_dropped_when_it_fits():
    msgs = [Msg("user", "hi"), Msg("assistant", "hello"), Msg("user", "again")]
    ids, dropped = fit_messages(msgs, render, 1000)
    assert ids == render(msgs) and dropped == 0


def test_oldest_dropped_system_and_latest_kept():
    msgs = [
        Msg("system", "S"),
        *[Msg(r, f"m{i}" * 5) for i, r in enumerate(["user", "assistant"] * 5)],
    ]
    msgs.append(Msg("user", "last"))
    full = len(render(msgs))
    ids, dropped = fit_messages(msgs, render, full - 20)
    assert len(ids) <= full - 20 and dropped >= 1
    text = "".join(chr(i) for i in ids[1:])
    assert text.startswith("<system>S\n") and text.endswith("<user>last\n")
    assert "m0" not in text  # the oldest went first
    # Too small for even the latest message: it stays, with the system message.
    ids, dropped = fit_messages(msgs, render, 3)
    assert ids == render([msgs[0], msgs[-1]]) and dropped == len(msgs) - 2


def test_a_tool_result_keeps_its_calling_turn():
    msgs = [
        Msg("user", "x" * 40),
        Msg("assistant", "call"),
        Msg("tool", "r1"),
        Msg("tool", "r2"),
    ]
    # Room for the tool results but not the user turn: the assistant call comes along.
    ids, _ = fit_messages(msgs, render, len(render(msgs[1:])))
    assert ids == render(msgs[1:])


@pytest.mark.parametrize("seed", range(30))
def test_bisection_equals_trying_every_start(seed):
    rng = random.Random(seed)
    roles = ["system", "user", "assistant", "tool"]
    msgs = [Msg(rng.choice(roles), "y" * rng.randint(0, 30)) for _ in range(rng.randint(1, 25))]
    limit = rng.randint(1, len(render(msgs)) + 5)
    assert fit_messages(msgs, render, limit)[0] == brute_force(msgs, limit)


@pytest.mark.parametrize(
    ("context", "keep", "length"),
    [(8, 3, 6), (4096, 4, 2050), (4096, 5, 2051), (8, 99, 7)],  # Ollama's own cases
)
def test_head_and_tail_lengths_follow_ollama(context, keep, length):
    ids = list(range(100, 100 + 3 * context))
    out = keep_head_and_tail(ids, context, keep, bos=None)
    assert len(out) == length
    kept = min(keep, context - 1)
    assert out[:kept] == ids[:kept] and out[kept:] == ids[len(ids) - (length - kept) :]


def test_head_and_tail_counts_a_bos_and_leaves_short_prompts_alone():
    ids = [BOS_ID, *range(100, 200)]
    out = keep_head_and_tail(ids, 40, 4, bos=BOS_ID)
    assert out[:5] == ids[:5] and out[-1] == ids[-1] and len(out) == 40 - (40 - 5) // 2
    assert keep_head_and_tail(ids[:10], 40, 4, bos=BOS_ID) == ids[:10]
    assert len(keep_head_and_tail(ids, 40, -1, bos=BOS_ID)) == 39  # keep all: the head


# --- over HTTP ----------------------------------------------------------------------------


@pytest.fixture
def eng() -> FakeEngine:
    e = FakeEngine()
    e.add_model("small:latest", context_length=128)
    return e


@pytest.fixture
def client(eng):
    with TestClient(make_app(eng, host="0.0.0.0")) as c:
        yield c


def history(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return [*msgs, {"role": "user", "content": "final question"}]


def prompt_text(eng: FakeEngine) -> str:
    return "".join(chr(i - OFFSET) for i in eng.requests[-1].prompt_token_ids if i >= OFFSET)


def test_chat_drops_old_turns_to_fit_num_ctx(client, eng):
    body = {"model": "small:latest", "messages": history(20), "stream": False}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_eval_count"] <= 127
    text = prompt_text(eng)
    assert text.startswith("<system>be brief\n") and text.endswith(
        "<user>final question\n<assistant>"
    )
    assert "q0" not in text and "a19" in text
    # The same with a num_ctx smaller than the model's.
    r = client.post("/api/chat", json={**body, "options": {"num_ctx": 60}})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] <= 59
    assert prompt_text(eng) == "<system>be brief\n<user>final question\n<assistant>"


def test_a_context_of_one_token_is_400_not_an_empty_prompt(client):
    body = {"model": "small:latest", "prompt": "hello", "options": {"num_ctx": 1}}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 400 and "context length" in r.json()["error"]


def test_truncate_false_refuses_with_400(client):
    body = {"model": "small:latest", "messages": history(20), "truncate": False}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 400 and "context length" in r.json()["error"]
    gen = {"model": "small:latest", "prompt": "z" * 200, "raw": True, "truncate": False}
    assert client.post("/api/generate", json=gen).status_code == 400


def test_one_long_message_keeps_its_head_and_tail(client, eng):
    body = {"model": "small:latest", "prompt": "H" * 10 + "m" * 200 + "TAIL", "raw": True}
    r = client.post("/api/generate", json={**body, "stream": False, "options": {"num_keep": 6}})
    assert r.status_code == 200, r.text
    ids = eng.requests[-1].prompt_token_ids
    assert len(ids) == 128 - (128 - 7) // 2  # a BOS, 6 kept, then the tail: room to answer
    text = prompt_text(eng)
    assert text.startswith("H" * 6 + "m") and text.endswith("mTAIL")
    assert r.json()["eval_count"] >= 1
