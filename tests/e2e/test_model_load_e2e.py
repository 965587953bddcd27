"""Loading a second model does not stall the streams of the first (issue 12's acceptance): the
load runs off the engine thread and holds the GIL only briefly, so a stream's tokens keep their
pace while it happens.

Measured on the stream's own clock, not in seconds: every gap between two tokens that arrive
while the other model loads is compared with the stream's median gap. A load on the engine
thread would show one gap as long as the whole load (a second or more against a step of tens
of milliseconds); the bound below allows the slower steps of a CPU shared with the load.
A tokenizer whose files match a loaded model's is shared, not parsed again, so the twin below
shares the first model's (2.1-2.4x the median gap, load average ~2, 2026-11-30). A model with
a tokenizer of its own still shows one gap of 5.1-5.4x: tokenizers' Rust parse of
tokenizer.json (~90 ms CPU for SmolLM2's 49k BPE) holds the GIL and no public API releases it.
That case is not a test here: near the bound on an idle machine, it would pass or fail by load.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.launch import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smollm2:135m"
SECOND = "smollm2:twin"  # a copy under another name: a real load of real weights
MAX_GAP_RATIO = 4.0  # a gap during the load, over the stream's median gap


@pytest.fixture
def two_models(smollm2_dir: Path, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(smollm2_dir, models / "smollm2--135m")
    shutil.copytree(smollm2_dir, models / "smollm2--twin")
    return models


def stream_arrivals(base: str, max_tokens: int, arrivals: list[float]) -> None:
    """Stream one greedy completion, appending each content chunk's arrival time."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if any(c["delta"].get("content") for c in chunk["choices"]):
                arrivals.append(time.monotonic())


def test_loading_a_second_model_does_not_stall_a_stream(
    two_models: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = start_server(two_models).url
    ps = httpx.get(base + "/api/ps", timeout=30).json()["models"]
    assert ps == []  # nothing loaded yet: the second load below is a real one
    warm: list[float] = []
    stream_arrivals(base, 4, warm)  # loads the first model

    arrivals: list[float] = []
    streaming = threading.Thread(target=stream_arrivals, args=(base, 160, arrivals))
    streaming.start()
    while len(arrivals) < 30 and streaming.is_alive():
        time.sleep(0.05)  # waiting for the stream to reach its pace: nothing to block on
    started = time.monotonic()
    r = httpx.post(base + "/api/generate", json={"model": SECOND}, timeout=600)
    ended = time.monotonic()
    assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
    streaming.join()

    assert SECOND in {m["name"] for m in httpx.get(base + "/api/ps", timeout=30).json()["models"]}
    gaps = [(b, b - a) for a, b in zip(arrivals, arrivals[1:])]
    median = statistics.median(g for _, g in gaps)
    # Every gap that ends during the load, or the first one after it (a stall shows there).
    during = [g for t, g in gaps if started < t][: 1 + sum(started < t <= ended for t, _ in gaps)]
    assert during, "the stream ended before the load did: make it longer"
    worst = max(during) / median
    assert worst <= MAX_GAP_RATIO, (
        f"a gap of {max(during):.3f} s during a {ended - started:.2f} s load, "
        f"{worst:.1f}x the stream's median gap of {median:.3f} s"
    )
