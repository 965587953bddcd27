"""Memory stays near what is used: after a burst of streams and a moment idle, the server gives
MLX's buffer cache and the heap's free pages back, and its RSS returns to where it was plus
what the prefix cache kept of the burst's prompts. (`make soak` checks the bound under load.)"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
STREAMS = 16
SLACK = 64 << 20  # the interpreter's own growth (objects, a fragmented heap) a burst may leave
RELEASE_WAIT = 120.0  # seconds to wait for the idle release (the setting is 2 s)


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, flags=re.M)}


def wait_for_release(base: str, after: float) -> dict[str, float]:
    """The metrics once the idle engine has released memory more than `after` times."""
    deadline = time.monotonic() + RELEASE_WAIT
    while True:
        m = metrics(base)
        if m["mlxd_memory_releases_total"] > after and m["mlxd_running_sequences"] == 0:
            return m
        assert time.monotonic() < deadline, "the idle engine never released its memory"
        time.sleep(0.2)  # polling another process's state: nothing to wait on


def stream(base: str, i: int) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Story {i}: write about a city by the sea."}],
        "max_tokens": 48,
        "ignore_eos": True,
        "stream": True,
    }
    chunks = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert "error" not in json.loads(line[6:])
                chunks += 1
    return chunks


def test_a_burst_leaves_no_cache_and_rss_back_near_its_baseline(live_server: str) -> None:
    base = live_server
    count = metrics(base)["mlxd_memory_releases_total"]
    stream(base, -1)  # the model loaded, one request's buffers made
    before = wait_for_release(base, count)
    assert before["mlxd_mlx_cache_bytes"] == 0

    with ThreadPoolExecutor(STREAMS) as pool:
        assert all(n > 0 for n in pool.map(lambda i: stream(base, i), range(STREAMS)))
    during = metrics(base)
    after = wait_for_release(base, during["mlxd_memory_releases_total"])

    assert during["mlxd_mlx_cache_bytes"] <= during["mlxd_mlx_cache_limit_bytes"]
    assert after["mlxd_mlx_cache_bytes"] == 0
    kept = after["mlxd_prefix_cache_bytes"] - before["mlxd_prefix_cache_bytes"]
    # MLX holds only the weights and what the prefix cache kept; the KV of the burst is gone.
    active = after["mlxd_mlx_active_bytes"] - before["mlxd_mlx_active_bytes"]
    assert active <= kept + (1 << 20), (active, kept)
    grown = after["mlxd_process_resident_bytes"] - before["mlxd_process_resident_bytes"]
    assert grown <= kept + SLACK, (grown / 1e6, kept / 1e6)
