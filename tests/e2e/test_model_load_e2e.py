"""A model load, or a GGUF import, does not stall the streams of a loaded model for more than
about one step (issue 12's acceptance).

- A second model whose tokenizer files match the first's shares its tokenizer (models/
  tokenizer.py), and its load holds the GIL only in short stretches, on a thread in the
  background (models/load_thread.py). Measured on the stream's own clock: the longest gap
  between two tokens while the model loads, over the stream's median gap. A stall of one step
  shows as a gap of two; MAX_GAP_RATIO allows half a step more for a 2-core CPU that the load
  shares with the stream. Other processes' noise shows as long gaps too, so the load runs RUNS
  times and the best run is judged: a stall our code causes comes back every time, noise
  seldom does.
- What is not the load is kept out of the window: the server drafts no tokens (a verify pass
  is one step that takes up to ~3 plain ones, so a quiet greedy stream already shows gaps of
  2-3x its median), and the load's request goes through a client made beforehand (a new httpx
  client builds an SSL context: ~10-20 ms of this process's CPU on the same 2 cores).
- A GGUF import runs in a child process (models/gguf_process.py). In the server's process it
  stalled a stream for up to ~0.6-0.9 s (18-29x the median gap). Its gaps are not judged by
  the clock: over the seconds an import takes, a shared machine's noise decides the longest
  gap (an idle 10 s window of a stream showed gaps of 14-16x its median at load average 7-10).
  The test checks instead what makes a stall impossible: the server process spends next to
  no CPU on the import, so it cannot hold the server's GIL.
- Not tested: a model with a tokenizer of its own. tokenizers parses tokenizer.json in Rust
  holding the GIL, and no API of tokenizers 0.23 releases it (from_file, from_str, from_buffer
  alike): ~66 ms of CPU for SmolLM2's 49k BPE (5-24x the median gap here, by load), ~1.0 s
  for gemma3's 262k vocabulary with 515k merges.
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
MAX_GAP_RATIO = 2.5  # the longest gap during the work, over the stream's median gap
RUNS = 3  # times each case runs; the best is judged


@pytest.fixture
def two_models(smollm2_dir: Path, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(smollm2_dir, models / "smollm2--135m")
    shutil.copytree(smollm2_dir, models / "smollm2--twin")
    return models


def stream_arrivals(base: str, arrivals: list[float], stop: threading.Event) -> None:
    """Stream one long greedy completion, appending each content chunk's arrival time, until
    `stop` is set (closing the stream ends the request)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": 4000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if stop.is_set():
                return
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if any(c["delta"].get("content") for c in chunk["choices"]):
                arrivals.append(time.monotonic())


def worst_gap(base: str, work: Callable[[], None]) -> tuple[float, str]:
    """The longest gap of a stream while `work` runs, over the stream's median gap, and a line
    saying what was measured."""
    arrivals: list[float] = []
    stop = threading.Event()
    streaming = threading.Thread(target=stream_arrivals, args=(base, arrivals, stop))
    streaming.start()
    try:
        while len(arrivals) < 30 and streaming.is_alive():
            time.sleep(0.05)  # waiting for the stream to reach its pace: nothing to block on
        started = time.monotonic()
        work()
        ended = time.monotonic()
        count = len(arrivals)
        while len(arrivals) < count + 5 and streaming.is_alive():
            time.sleep(0.05)  # the gap that ends just after the work, and a few more
    finally:
        stop.set()
        streaming.join()
    gaps = [(b, b - a) for a, b in zip(arrivals, arrivals[1:])][3:]  # past the first tokens
    median = statistics.median(g for _, g in gaps)
    # Every gap that ends during the work, and the first one after it (a stall shows there).
    during = [g for t, g in gaps if started < t][: 1 + sum(started < t <= ended for t, _ in gaps)]
    assert len(during) > 1, "the stream ended before the work did: make it longer"
    ratio = max(during) / median
    return ratio, (
        f"{max(during):.3f} s during {ended - started:.2f} s of work: {ratio:.1f}x "
        f"the median gap of {median:.3f} s"
    )


def judge(runs: list[tuple[float, str]]) -> None:
    best = min(ratio for ratio, _ in runs)
    assert best <= MAX_GAP_RATIO, "longest gaps: " + "; ".join(line for _, line in runs)


def test_loading_a_second_model_does_not_stall_a_stream(
    two_models: Path, start_server: Callable[..., ServerProcess]
) -> None:
    base = start_server(two_models, MLXD_SPECULATIVE="off").url
    with httpx.Client(base_url=base, timeout=600) as client:
        assert client.get("/api/ps").json()["models"] == []

        def load() -> None:
            r = client.post("/api/generate", json={"model": SECOND})
            assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text

        runs = []
        for _ in range(RUNS):
            runs.append(worst_gap(base, load))  # a real load each time: unloaded below
            assert SECOND in {m["name"] for m in client.get("/api/ps").json()["models"]}
            r = client.post("/api/generate", json={"model": SECOND, "keep_alive": 0})
            assert r.status_code == 200 and r.json()["done_reason"] == "unload", r.text
    judge(runs)


def test_a_gguf_import_runs_outside_the_server_process(
    smollm2_dir: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """What makes an import's stall impossible, measured without a clock: the server process
    spends next to no CPU on it (its child spends it all), so it cannot hold the server's GIL.
    Its progress streams as it goes and the model is there at the end."""
    import psutil

    from models.default import bundled_gguf

    gguf = bundled_gguf(MODEL)
    assert gguf is not None
    models = tmp_path / "models"
    shutil.copytree(smollm2_dir, models / "smollm2--135m")
    server = start_server(models, MLXD_IMPORT_DIRS=str(Path(gguf).parent))
    proc = psutil.Process(server.proc.pid)
    before = proc.cpu_times()
    body = {"model": "imported:latest", "from": str(gguf)}
    with httpx.stream("POST", server.url + "/api/create", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    after = proc.cpu_times()
    assert events[-1] == {"status": "success"}, events[-3:]
    progress = [e["completed"] for e in events if "completed" in e]
    assert len(progress) > 100 and progress == sorted(progress), events[:3]
    tags = httpx.get(server.url + "/api/tags", timeout=30).json()["models"]
    assert "imported:latest" in {m["name"] for m in tags}

    own = after.user + after.system - before.user - before.system
    child = (
        after.children_user + after.children_system - before.children_user - before.children_system
    )
    assert child > 1.0 and own < 0.1 * child, f"server {own:.2f} s of CPU, child {child:.2f} s"
