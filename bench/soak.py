"""`make soak`: the real server under a long mixed load, its memory sampled all along.

Starts `mlxd serve` on the default model (this checkout's, or another source tree's with
--checkout, to compare), reads its memory before any model is loaded, then keeps N streams
going for the duration: chat prompts of varied lengths (half behind one of a few shared system
prompts, so the prefix cache fills), sampled, a quarter of them cancelled mid-stream. /metrics is
scraped every half second (RSS, weights, KV in use, prefix cache, MLX cache); after the load the
server is left idle until it releases memory, and the table says whether RSS stayed within the
bound (bench/soak_report.py). Exit status 0 when every check passes.

    python scripts/soak.py [--streams 32] [--duration 300] [--cancel 0.25] [--margin 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import httpx

from bench.launch import ROOT, ServerFailed, mlxd_server
from bench.loadgen import make_prefix, make_prompt
from bench.soak_report import Sample, SoakResult, Traffic, format_soak, parse_metrics

OUT = ROOT / ".bench"
IDLE_WAIT = 15.0  # seconds to wait after the load for the idle release (a few idle_release)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=32, help="streams kept going at once")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--cancel", type=float, default=0.25, help="fraction cancelled mid-stream")
    p.add_argument("--margin", type=float, default=0.2, help="allowed over weights+KV+prefix")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens a stream asks for")
    p.add_argument("--model", default="smollm2:135m", help="model to stream from")
    p.add_argument("--models-dir", help="the server's models dir (default: its own default)")
    p.add_argument("--checkout", type=Path, default=ROOT, help="source tree to serve from")
    p.add_argument("--serve-args", default="", help="more `mlxd serve` flags, quoted")
    p.add_argument("--label", default="", help="name in the table (default: the checkout's)")
    p.add_argument("--json", metavar="PATH", help="write samples and verdicts as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, pid: int):
        self.args = args
        self.url = url
        self.pid = pid
        self.rng = random.Random(args.seed)
        self.traffic = Traffic()
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self.systems = [make_prefix(n, f"s{i}") for i, n in enumerate((64, 128, 256))]

    async def sample(self, client: httpx.AsyncClient) -> Sample:
        text = (await client.get("/metrics")).text
        return parse_metrics(text, time.monotonic() - self.t0, rss=_rss_of(self.pid))

    def body(self, model: str) -> tuple[dict, int | None]:
        """A request, and after how many chunks to cancel it (None: read it to the end)."""
        rng = self.rng
        messages = [{"role": "user", "content": make_prompt(rng.randint(8, 64), rng.randrange(99))}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": rng.choice(self.systems)})
        max_tokens = rng.randint(16, self.args.max_tokens)
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "stream": True,
        }
        cancel = (
            rng.randint(1, max(1, max_tokens // 2)) if rng.random() < self.args.cancel else None
        )
        return body, cancel

    async def stream(self, client: httpx.AsyncClient, model: str) -> None:
        body, cancel_after = self.body(model)
        chunks, texts = 0, 0
        last = time.monotonic()
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    self.traffic.error(f"{r.status_code}: {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if '"error"' in line[:20]:
                        self.traffic.error(line[:200])
                        return
                    chunks += 1
                    if _has_text(line):  # not the role's opening chunk
                        now = time.monotonic()
                        (self.traffic.itl if texts else self.traffic.ttft).append(now - last)
                        last, texts = now, texts + 1
                    if cancel_after is not None and chunks >= cancel_after:
                        self.traffic.cancelled += 1
                        return  # leaving the block closes the connection mid-stream
            self.traffic.completed += 1
        except httpx.HTTPError as e:
            self.traffic.error(f"{type(e).__name__}: {e}")
        finally:
            self.traffic.tokens += chunks

    async def run(self, model: str) -> tuple[Sample, Sample]:
        limits = httpx.Limits(max_connections=self.args.streams + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=600, limits=limits) as client:
            base = await self.sample(client)

            async def worker() -> None:
                while True:
                    await self.stream(client, model)

            async def sampler() -> None:
                while True:
                    self.samples.append(await self.sample(client))
                    await asyncio.sleep(0.5)

            watch = asyncio.create_task(sampler())
            workers = [asyncio.create_task(worker()) for _ in range(self.args.streams)]
            # At the deadline the streams still running are cut off (the server aborts them).
            _, late = await asyncio.wait(workers, timeout=self.args.duration)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            watch.cancel()
            return base, await self.idle(client)

    async def idle(self, client: httpx.AsyncClient) -> Sample:
        """The server's memory once idle: when the streams cut off at the deadline have left,
        after its next idle release (or IDLE_WAIT seconds for servers that do not count them)."""
        s = await self.sample(client)
        while s.running > 0:
            await asyncio.sleep(0.5)
            s = await self.sample(client)
        drained = s
        end = time.monotonic() + IDLE_WAIT
        while time.monotonic() < end:
            await asyncio.sleep(0.5)
            s = await self.sample(client)
            if drained.releases >= 0 and s.releases > drained.releases:
                break
        return s


def _has_text(line: str) -> bool:
    """An SSE data line whose chunk carries generated text."""
    try:
        choices = json.loads(line[len("data: ") :]).get("choices") or []
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


def _rss_of(pid: int) -> int | None:
    """The process's RSS from the OS (for servers that do not export it)."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # noqa: BLE001 - gone, or no psutil: the metric alone then
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    OUT.mkdir(exist_ok=True)
    checkout = args.checkout.resolve()
    label = args.label or ("this checkout" if checkout == ROOT else str(checkout))
    models = Path(args.models_dir).expanduser() if args.models_dir else None
    server = mlxd_server(
        OUT / "soak-server.log", models, shlex.split(args.serve_args), root=checkout
    )
    try:
        server.start(600.0)
    except ServerFailed as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    try:
        assert server.proc is not None
        soak = Soak(args, server.url, server.proc.pid)
        base, idle = asyncio.run(soak.run(args.model))
    finally:
        server.stop()
    result = SoakResult(
        label=f"{label}, {args.model}",
        streams=args.streams,
        duration=args.duration,
        cancel_fraction=args.cancel,
        margin=args.margin,
        base=base,
        samples=soak.samples,
        idle=idle,
        traffic=soak.traffic,
        load_average=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )
    print(format_soak(result))
    for message in soak.traffic.first_errors:
        print(f"  error: {message}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
    return 0 if result.passed else 1
