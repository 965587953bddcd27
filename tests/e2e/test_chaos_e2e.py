"""Chaos on the real model: 8 greedy streams run while another client sends every hostile request
of issue 17's table and random fuzzed bodies. Every stream must end with its solo text, the
hostile requests must get 4xx (the seeds, which are valid, anything but a 5xx), the server must
stay alive and its RSS bounded. The streams run in rounds for MLXD_CHAOS_SECONDS (at least one
round; make fuzz sets a longer time), the attacker all along.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
VOCAB = 49152
SECONDS = float(os.environ.get("MLXD_CHAOS_SECONDS", "15"))
MAX_TOKENS = 24
# The hostile phase may not grow the server by a GiB, not counting MLX's buffer cache (freed
# buffers kept for reuse, bounded by the cache limit the registry sets).
RSS_GROWTH = 1 << 30
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Count from one to five.",
    "What do bees make?",
    "Say hello in Spanish.",
    "What is two plus two?",
    "Name a large ocean.",
    "What is the opposite of hot?",
]

# (method, path, JSON body or raw text, the statuses it may get)
Hostile = tuple[str, str, Any, tuple[int, ...]]
FOUR = tuple(range(400, 500))


def hostile_table() -> list[Hostile]:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    return [
        ("POST", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999999]}, (400,)),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": [[1, 2], [3, 99999999]]}, (400,)),
        ("POST", "/v1/embeddings", {"model": MODEL, "input": [1, 2, 99999999]}, (400,)),
        (
            "POST",
            "/api/generate",
            {"model": MODEL, "context": [1, 99999999], "stream": False},
            (400,),
        ),  # fmt: skip
        ("POST", "/v1/completions", {"model": MODEL, "prompt": [VOCAB]}, (400,)),
        ("POST", "/v1/embeddings", {"model": MODEL, "input": [[-3, 2]]}, (400,)),
        ("POST", "/v1/chat/completions", {**chat, "seed": -1, "temperature": 1.0}, (200,)),
        ("POST", "/v1/chat/completions", {**chat, "seed": 2**64, "temperature": 1.0}, (400,)),
        ("POST", "/v1/chat/completions", {**chat, "seed": 2**64 - 1, "temperature": 1.0}, (200,)),
        (
            "POST",
            "/v1/chat/completions",
            '{"model":"' + MODEL + '","messages":[{"role":"user","content":"\\ud800"}]}',
            (400,),
        ),  # fmt: skip
        ("POST", "/v1/chat/completions", {**chat, "logit_bias": {"99999999": 5}}, (400,)),
        (
            "POST",
            "/api/create",
            {"model": "evil:1", "from": "/etc/passwd", "stream": False},
            (403,),
        ),
        (
            "POST",
            "/api/create",
            {"model": "evil:1", "from": "/no/such/file", "stream": False},
            (403,),
        ),
        (
            "POST",
            "/api/chat",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "options": {"num_ctx": "abc"},
            },
            (400,),
        ),  # fmt: skip
        ("POST", "/v1/chat/completions", {**chat, "max_tokens": 10**30}, (400,)),
        ("POST", "/v1/chat/completions", {**chat, "n": 10**6}, (400,)),
        ("POST", "/v1/chat/completions", '{"model":"m","temperature":NaN}', (400,)),
        ("POST", "/v1/chat/completions", '{"a":' + "[" * 100_000 + "}", (400,)),
        ("POST", "/v1/chat/completions", {**chat, "messages": []}, (400,)),
        (
            "POST",
            "/api/generate",
            {
                "model": MODEL,
                "prompt": "hi",
                "stream": False,
                "keep_alive": "99999999999h",
                "options": {"num_predict": 2, "repeat_last_n": 10**12, "repeat_penalty": 1.2},
            },
            (200,),
        ),  # fmt: skip
        ("GET", "/api/ps", "", (200,)),
    ]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, 2**63, 2**64, VOCAB, -(2**63) - 1, 99999999])
    if kind == 1:
        return rng.choice([0.0, -1e308, 1e308, 0.5, 2.5, -0.0])
    if kind == 2:
        return "".join(rng.choice(["a", "\u0000", "\ud800", "é", "{{", "\n", " "]) for _ in range(rng.randrange(6)))  # fmt: skip
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.choice([MODEL, "nope", "", "../../x", "a" * 300])
    if kind == 5:
        return [rng.randrange(-5, 60000) for _ in range(rng.randrange(5))]
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return _random_dict(rng, depth + 1)


def _random_dict(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = ["model", "messages", "prompt", "input", "context", "options", "seed", "max_tokens", "stop", "logit_bias", "n", "top_k", "from", "files"]  # fmt: skip
    return {rng.choice(keys): _random_value(rng, depth) for _ in range(rng.randrange(5))}


FUZZ_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat", "/api/generate", "/api/embed", "/api/show", "/api/create", "/api/copy"]  # fmt: skip


def fuzz_body(rng: random.Random) -> tuple[str, str]:
    body = {"model": MODEL, **(_random_dict(rng, 2) if rng.random() < 0.7 else {})}
    for key in ("messages", "prompt", "input", "context", "options"):
        if rng.random() < 0.3:
            body[key] = _random_value(rng, 1)
    if body.get("max_tokens") is None:  # absent or null: the rest of the context
        body["max_tokens"] = 4
    body["stream"] = rng.random() < 0.3
    if isinstance(body.get("options"), dict):
        body["options"]["num_predict"] = 4
    else:
        body["options"] = {"num_predict": 4}
    return rng.choice(FUZZ_PATHS), json.dumps(body)  # lone surrogates as \ud800 escapes


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def gauge(base: str, name: str) -> int:
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError(f"{name} missing from /metrics")


def resident(base: str, pid: int) -> int:
    """RSS less MLX's buffer cache: what the process holds beyond reusable free buffers."""
    return rss_bytes(pid) - gauge(base, "mlxd_mlx_cache_bytes")


def stream_text(base: str, question: str) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    parts = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                parts.append(c["delta"].get("content") or "")
    return "".join(parts)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS read from /proc")
def test_chaos(live_server: str) -> None:
    base = live_server
    pid = live_server.pid  # type: ignore[attr-defined]
    solo = [stream_text(base, q) for q in QUESTIONS]
    baseline = resident(base, pid)
    active = gauge(base, "mlxd_mlx_active_bytes")
    peak = [baseline]
    done = threading.Event()
    wrong: list[str] = []
    sent = [0]

    def hostile() -> None:
        rng = random.Random(17)
        table = hostile_table()
        with httpx.Client(base_url=base, timeout=120) as c:
            i = 0
            while i < len(table) or not done.is_set():
                if i < len(table):
                    method, path, body, allowed = table[i]
                else:
                    method, path, body, allowed = "POST", *fuzz_body(rng), FOUR + (200,)
                i += 1
                raw = body if isinstance(body, str) else json.dumps(body)
                r = c.request(method, path, content=raw, headers={"content-type": "application/json"})  # fmt: skip
                sent[0] += 1
                if r.status_code not in allowed:
                    wrong.append(f"{path} {raw[:160]} -> {r.status_code} {r.text[:200]}")
                peak[0] = max(peak[0], resident(base, pid))

    # Rounds of 8 concurrent streams for SECONDS (at least one), the attacker all along.
    deadline = time.monotonic() + SECONDS
    rounds: list[list[str]] = []
    with ThreadPoolExecutor(len(QUESTIONS) + 1) as pool:
        attacker = pool.submit(hostile)
        try:
            while not rounds or time.monotonic() < deadline:
                streams = [pool.submit(stream_text, base, q) for q in QUESTIONS]
                rounds.append([f.result() for f in streams])
        finally:
            done.set()
            attacker.result()

    assert not wrong, "\n".join(wrong)
    assert sent[0] >= len(hostile_table())
    for together in rounds:
        for q, a, b in zip(QUESTIONS, solo, together):
            assert a == b, f"{q!r}: solo {a!r} != under chaos {b!r}"
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert stream_text(base, QUESTIONS[0]) == solo[0]
    assert peak[0] - baseline < RSS_GROWTH, (baseline, peak[0])
    # Nothing the attack sent is still held as MLX arrays once it is over, beyond what the prefix
    # cache may keep of finished prompts (prefix_cache_bytes, 256 MiB by default).
    assert gauge(base, "mlxd_mlx_active_bytes") - active < (256 + 128) << 20
