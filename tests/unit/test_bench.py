"""The load generator's statistics and its client, against a tiny in-process OpenAI SSE server."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import llamacpp
from bench.cli import main
from bench.compare import format_comparison, format_result
from bench.loadgen import (
    BenchResult,
    LevelResult,
    LoadConfig,
    LoadGenerator,
    RequestResult,
    percentile,
    summarize,
)
from bench.suite import Peer, SuiteResult, SuiteRow, format_suite, format_ttft, run_suite


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([1.0, 2.0], 100) == 2.0


def test_itls_spread_multi_token_chunks() -> None:
    r = RequestResult(ok=True, ttft=0.1, chunk_times=[0.1, 0.2, 0.4], output_tokens=3)
    assert r.itls == pytest.approx([0.1, 0.2])
    # 5 tokens in 3 chunks: each later chunk carried 2 tokens, so a gap is two token times.
    r = RequestResult(ok=True, ttft=0.1, chunk_times=[0.1, 0.3, 0.5], output_tokens=5)
    assert r.itls == pytest.approx([0.1, 0.1])
    assert RequestResult(ok=True, chunk_times=[0.5], output_tokens=1).itls == []


def test_summarize_aggregates_tokens_per_second_and_errors() -> None:
    results = [
        RequestResult(ok=True, ttft=0.1, chunk_times=[0.1, 0.2], output_tokens=2, latency=0.2),
        RequestResult(ok=True, ttft=0.3, chunk_times=[0.3, 0.7], output_tokens=2, latency=0.7),
        RequestResult(ok=False, error="HTTP 503: busy", latency=0.01),
    ]
    lv = summarize(4, results, duration=2.0)
    assert (lv.requests, lv.errors, lv.output_tokens) == (3, 1, 4)
    assert lv.tokens_per_s == pytest.approx(2.0)
    assert lv.ttft_p50 == pytest.approx(0.2)
    assert lv.itl_p50 == pytest.approx(0.25)
    assert lv.error_sample == "HTTP 503: busy"


class FakeOpenAI:
    """Streams `tokens` one-word chunks; optionally reports usage, fails, or sends an error frame."""

    def __init__(self, tokens: int = 5, usage: bool = True):
        self.tokens, self.usage = tokens, usage
        self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.fail_status: int | None = None
        self.error_frame = False
        self.app = FastAPI()
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/chat/completions")(self.chat)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def chat(self, request: Request) -> object:
        body = await request.json()
        self.bodies.append(body)
        if self.fail_status:
            return JSONResponse({"error": {"message": "busy"}}, status_code=self.fail_status)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        for _ in range(20):  # let the other workers' requests arrive
            await asyncio.sleep(0)

        async def events():
            try:
                for i in range(self.tokens):
                    chunk = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if self.error_frame:
                    yield 'data: {"error": {"message": "engine failed"}}\n\n'
                if self.usage:
                    usage = {"prompt_tokens": 9, "completion_tokens": self.tokens}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://fake")


async def test_levels_count_tokens_and_respect_concurrency() -> None:
    fake = FakeOpenAI(tokens=5)
    cfg = LoadConfig(base_url="http://fake", concurrency=[1, 4], requests=8, warmup=1)
    async with fake.client() as client:
        result = await LoadGenerator(cfg, client).run("fake")
    assert result.model == "fake-model"
    assert [lv.concurrency for lv in result.levels] == [1, 4]
    assert all(lv.requests == 8 and lv.errors == 0 for lv in result.levels)
    assert all(lv.output_tokens == 40 for lv in result.levels)
    assert all(lv.tokens_per_s > 0 and lv.ttft_p50 > 0 for lv in result.levels)
    assert fake.max_in_flight == 4
    assert len(fake.bodies) == 1 + 8 + 8  # warm-up + two levels
    body = fake.bodies[-1]
    assert body["stream"] is True and body["max_tokens"] == 64 and body["model"] == "fake-model"


async def test_tokens_counted_by_chunks_without_usage() -> None:
    fake = FakeOpenAI(tokens=3, usage=False)
    cfg = LoadConfig(base_url="http://fake", concurrency=[2], requests=2, warmup=0)
    async with fake.client() as client:
        result = await LoadGenerator(cfg, client).run()
    assert result.levels[0].output_tokens == 6


async def test_errors_are_counted_not_raised() -> None:
    fake = FakeOpenAI()
    fake.fail_status = 503
    cfg = LoadConfig(base_url="http://fake", concurrency=[2], requests=3, warmup=0, model="m")
    async with fake.client() as client:
        result = await LoadGenerator(cfg, client).run()
    lv = result.levels[0]
    assert (lv.errors, lv.output_tokens) == (3, 0)
    assert lv.error_sample.startswith("HTTP 503")
    fake.fail_status, fake.error_frame = None, True
    async with fake.client() as client:
        result = await LoadGenerator(cfg, client).run()
    assert result.levels[0].errors == 3
    assert result.levels[0].error_sample == "engine failed"


async def test_shared_prefix_sends_one_system_prompt_and_times_cold_and_warm() -> None:
    fake = FakeOpenAI()
    cfg = LoadConfig(
        base_url="http://fake", concurrency=[2], requests=2, warmup=1, shared_prefix=True
    )
    async with fake.client() as client:
        result = await LoadGenerator(cfg, client).run()
    warmup, measured = fake.bodies[0], fake.bodies[1:]
    assert warmup["messages"][0]["role"] == "user"  # the warm-up must not prime the prefix
    systems = {b["messages"][0]["content"] for b in measured}
    assert len(systems) == 1 and len(systems.pop()) > 3000  # ~1,000 tokens, one shared prefix
    assert len({b["messages"][1]["content"] for b in measured}) == len(measured)  # unique asks
    assert result.prefix_cold_ttft is not None and result.prefix_warm_ttft is not None


def _result(label: str, tps: float, ttft: float) -> BenchResult:
    lv = summarize(
        4, [RequestResult(ok=True, ttft=ttft, chunk_times=[ttft], output_tokens=1)], 1 / tps
    )
    return BenchResult(label, f"http://{label}", "m", {}, [lv])


def test_comparison_table_has_both_runs_and_ratios() -> None:
    table = format_comparison(_result("ours", 40.0, 0.1), _result("theirs", 10.0, 0.4))
    assert "tok/s ours" in table and "tok/s theirs" in table
    assert "4.00x" in table  # throughput ratio
    assert "0.25x" in table  # TTFT ratio
    assert "ours" in format_result(_result("ours", 40.0, 0.1))


def test_cli_reports_an_unreachable_server_in_one_line(capsys: pytest.CaptureFixture) -> None:
    code = main(["--url", "http://127.0.0.1:9", "--concurrency", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("mlxd bench:")


def test_cli_rejects_bad_levels() -> None:
    with pytest.raises(SystemExit):
        main(["--concurrency", "0,4"])


# --- three servers side by side (bench/suite.py) ---------------------------------------------


async def test_suite_interleaves_servers_per_level_and_protocol() -> None:
    fakes = {"mlxd": FakeOpenAI(tokens=4), "peer": FakeOpenAI(tokens=2)}
    order: list[tuple[str, float]] = []
    for label, fake in fakes.items():
        fake.app.middleware("http")(_recorder(order, label))
    peers = [Peer("mlxd", "http://fake"), Peer("peer", "http://fake", "their-model")]
    base = LoadConfig(base_url="", concurrency=[1, 2], requests=2, warmup=1)
    clients = {label: fake.client() for label, fake in fakes.items()}
    result = await run_suite(peers, base, [0.0, 0.7], clients)
    for c in clients.values():
        await c.aclose()
    assert [(r.temperature, r.concurrency) for r in result.rows] == [
        (0.0, 1), (0.0, 2), (0.7, 1), (0.7, 2)
    ]  # fmt: skip
    assert all(set(r.levels) == {"mlxd", "peer"} for r in result.rows)
    assert result.rows[0].levels["mlxd"].output_tokens == 8  # 2 requests x 4 tokens
    # each level runs on one server, then the other, before the next level starts
    labels = [label for label, _ in order]
    assert labels == ["mlxd", "peer"] + ["mlxd"] * 2 + ["peer"] * 2 + ["mlxd"] * 2 + [
        "peer"
    ] * 2 + (["mlxd", "peer"] + ["mlxd"] * 2 + ["peer"] * 2 + ["mlxd"] * 2 + ["peer"] * 2)
    temps = [b["temperature"] for b in fakes["peer"].bodies]
    assert temps == [0.0] * 5 + [0.7] * 5
    assert all(b["ignore_eos"] is True for f in fakes.values() for b in f.bodies)
    assert {b["model"] for b in fakes["peer"].bodies} == {"their-model"}
    assert {b["model"] for b in fakes["mlxd"].bodies} == {"fake-model"}  # first listed
    asks = [b["messages"][0]["content"] for b in fakes["peer"].bodies]
    assert len(set(asks)) == len(asks)  # no prompt repeats across levels and protocols
    assert asks == [b["messages"][0]["content"] for b in fakes["mlxd"].bodies]  # same load


def _recorder(order: list, label: str):
    async def record(request: Request, call_next):
        if request.url.path.endswith("/completions"):
            order.append((label, 0.0))
        return await call_next(request)

    return record


def _level(c: int, tps: float, ttft: float, itl: float, tokens: int = 64) -> LevelResult:
    return LevelResult(c, 4, 0, 1.0, tokens * 4, tps, ttft, ttft * 2, itl, itl, 1.0)


def test_suite_table_has_every_server_and_ratios_of_ours_to_each() -> None:
    rows = [
        SuiteRow(0.0, 1, {"mlxd": _level(1, 20, 0.1, 0.05), "llama.cpp": _level(1, 100, 0.05, 0.01),
                          "mlx-lm": _level(1, 10, 0.2, 0.08, tokens=50)}),
        SuiteRow(0.7, 16, {"mlxd": _level(16, 60, 0.5, 0.2), "llama.cpp": _level(16, 180, 1.0, 0.08),
                           "mlx-lm": _level(16, 60, 0.4, 0.2)}),
    ]  # fmt: skip
    table = format_suite(SuiteResult(["mlxd", "llama.cpp", "mlx-lm"], {}, rows))
    lines = table.splitlines()
    assert "mlxd/llama.cpp tok/s" in lines[0] and "mlxd/mlx-lm tok/s" in lines[0]
    assert "mlxd/llama.cpp TTFT p50" in lines[0]
    greedy, sampled = lines[2], lines[3]
    assert greedy.startswith("| greedy | 1 | 20.0 | 100.0 | 10.0 | 0.20x | 2.00x | 2.00x | 0.50x |")
    assert "| 100 / 50 / 200 |" in greedy and "| 50.0 / 10.0 / 80.0 |" in greedy
    assert sampled.startswith(
        "| T=0.7 | 16 | 60.0 | 180.0 | 60.0 | 0.33x | 1.00x | 0.50x | 1.25x |"
    )
    assert "output tokens per request: mlxd 64.0, llama.cpp 64.0, mlx-lm 57.0" in table


def test_suite_table_lists_errors() -> None:
    bad = _level(4, 10, 0.1, 0.05)
    bad.errors, bad.error_sample = 2, "HTTP 503: busy"
    table = format_suite(SuiteResult(["mlxd"], {}, [SuiteRow(0.0, 4, {"mlxd": bad})]))
    assert "mlxd (greedy, 4 streams): 2 errors, e.g. HTTP 503: busy" in table


async def test_suite_runs_every_prompt_length_and_reads_prompt_tokens() -> None:
    fakes = {"mlxd": FakeOpenAI(tokens=2), "peer": FakeOpenAI(tokens=2)}
    peers = [Peer("mlxd", "http://fake"), Peer("peer", "http://fake")]
    base = LoadConfig(base_url="", concurrency=[1], requests=2, warmup=0)
    clients = {label: fake.client() for label, fake in fakes.items()}
    result = await run_suite(peers, base, [0.0], clients, prompt_lengths=[64, 1000])
    for c in clients.values():
        await c.aclose()
    assert [(r.prompt_tokens, r.concurrency) for r in result.rows] == [(64, 1), (1000, 1)]
    asks = [len(b["messages"][0]["content"]) for b in fakes["peer"].bodies]
    assert asks[0] < 500 < 3000 < asks[-1]  # the long prompts are long
    assert result.rows[1].levels["mlxd"].prompt_tokens == 9  # the usage's count
    table = format_ttft(result).splitlines()
    assert "mlxd/peer TTFT p50" in table[0] and "prompt tok/s at TTFT p50" in table[0]
    assert table[3].startswith("| greedy | 9 | 1 |")


def test_ttft_table_ratios_and_prefill_rates() -> None:
    mine, theirs = _level(1, 2, 2.0, 0.05), _level(1, 8, 1.0, 0.01)
    mine.prompt_tokens = theirs.prompt_tokens = 1000.0
    table = format_ttft(SuiteResult(["mlxd", "llama.cpp"], {}, [SuiteRow(0.0, 1, {
        "mlxd": mine, "llama.cpp": theirs}, 1024)]))  # fmt: skip
    row = table.splitlines()[2]
    assert row.startswith("| greedy | 1000 | 1 | 2000 / 1000 | 2.00x | 500 / 1000 |"), row


# --- llama.cpp's server (bench/llamacpp.py) -------------------------------------------------


def test_llama_server_command_serves_16_slots_on_loopback() -> None:
    cmd = llamacpp.server_command(Path("/x/llama-server"), Path("/m.gguf"), 8080)
    text = " ".join(cmd)
    assert "--host 127.0.0.1" in text and "--port 8080" in text
    assert "-np 16" in text and "-t 2" in text and "-c 16384" in text and "-m /m.gguf" in text
    flags = llamacpp.cmake_args(Path("/src"), Path("/b"))
    assert {"-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"} <= set(flags)


def test_cached_llama_server_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(llamacpp, "build", lambda *a, **k: pytest.fail("must not build"))
    root = tmp_path / "mlxd" / "llama.cpp"
    assert llamacpp.cached_binary(root) is None
    for version in ("0.3.1", "0.3.2"):
        (root / version).mkdir(parents=True)
        (root / version / "llama-server").write_bytes(b"")
    assert llamacpp.ensure_server("0.3.1") == root / "0.3.1" / "llama-server"
    assert llamacpp.ensure_server() == root / "0.3.2" / "llama-server"  # the newest


# --- the per-step profile (bench/profile.py) ------------------------------------------------


def test_profile_wrappers_keep_the_output_and_time_every_op_class(tmp_path: Path) -> None:
    import mlx.core as mx

    from bench import profile
    from models.loader import load_model
    from tests.tiny import make_tiny_model

    lm = load_model(make_tiny_model(tmp_path / "m"), "tiny")
    batch, inputs = profile.make_batch(lm, 3, 12)
    expected = lm.model(inputs, cache=batch)
    clock = profile.Clock()
    root = profile.instrument(lm.model, clock)
    assert lm.model.layers[0].self_attn.n_heads == 4  # attributes still read through wrappers
    batch, _ = profile.make_batch(lm, 3, 12)
    clock.enabled = True
    got = root(inputs, cache=batch)
    clock.enabled = False
    assert mx.allclose(got, expected, atol=1e-5)
    timed = [profile.PROJ, profile.HEAD, profile.ATTN, profile.ROPE, profile.NORM, profile.ELEM]
    assert all(clock.totals[c] > 0 for c in [*timed, profile.PYTHON])
    args = argparse.Namespace(context=12, steps=2, warmup=1, temperature=0.7, model="tiny")
    split = profile.barriered_steps(lm, root, clock, 3, args)
    assert split[profile.SAMPLE] > 0 and split[profile.ATTN] > 0
    real = {3: profile.real_steps(lm, 3, args)}  # wrappers switched off: the plain model
    assert real[3][0] > real[3][1] > 0
    text = profile.report(lm, real, {3: split}, args)
    assert "3 rows" in text and "real step, no barriers" in text and "Barriers" in text


def test_prefill_profile_splits_a_prompt_by_op_class(tmp_path: Path) -> None:
    from bench import profile, profile_prefill
    from models.loader import load_model
    from tests.tiny import make_tiny_model

    lm = load_model(make_tiny_model(tmp_path / "m"), "tiny")
    args = argparse.Namespace(prefill=[20, 40], steps=1)
    text = profile_prefill.run_prefill(lm, args)
    head = next(line for line in text.splitlines() if line.startswith("ms per prefill"))
    assert "20 tokens" in head and "40 tokens" in head
    for title in (profile.PROJ, profile.ATTN, "real prefill, no barriers", "prefill tokens/s"):
        assert title in text
    assert "dequantizing every matmul weight" in text
