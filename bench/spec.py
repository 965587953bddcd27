"""`make bench-spec`: mlxd with speculative decoding off and on, side by side, one stream.

Two servers run the same build with `speculative` off and auto; requests alternate between them
(who goes first alternates too), so a noisy neighbour slows both alike. Two tasks: the plain chat
prompts of `make bench`, and copying a ~300-token text (the answer repeats the prompt, what
prompt-lookup drafting is for), each greedy and sampled (seeded: request i carries the same seed
on both servers). Reported per task and temperature: each server's decode tok/s (tokens after
the first over the time after the first, summed over the requests), their ratio, and whether
the answers were identical (sampled ones are where the verify pass computes the logits a
one-token step does; elsewhere they follow the same distribution).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import httpx

from bench.loadgen import LoadConfig, LoadGenerator, RequestResult
from bench.suite import Peer

TASKS = ("chat", "repeat")


@dataclass
class TaskResult:
    task: str
    temperature: float
    runs: dict[str, list[RequestResult]] = field(default_factory=dict)  # by peer label

    def decode_tps(self, label: str) -> float:
        ok = [r for r in self.runs[label] if r.ok]
        span = sum(r.latency - r.ttft for r in ok)
        return sum(r.output_tokens - 1 for r in ok) / span if span > 0 else 0.0

    def errors(self, label: str) -> int:
        return sum(not r.ok for r in self.runs[label])

    def identical(self, a: str, b: str) -> bool:
        return [r.text for r in self.runs[a]] == [r.text for r in self.runs[b]]

    def tokens(self, label: str) -> float:
        return statistics.mean(r.output_tokens for r in self.runs[label]) if self.runs else 0.0


async def run_ab(
    off: Peer,
    on: Peer,
    base: LoadConfig,
    rounds: int,
    max_tokens: dict[str, int],
    temperatures: tuple[float, ...] = (0.0,),
) -> list[TaskResult]:
    """`rounds` requests per server, task and temperature, alternating servers request by
    request."""
    results = []
    async with (
        httpx.AsyncClient(base_url=off.base_url, timeout=base.timeout) as c_off,
        httpx.AsyncClient(base_url=on.base_url, timeout=base.timeout) as c_on,
    ):
        clients = {off.label: c_off, on.label: c_on}
        for task, temperature in [(t, x) for t in TASKS for x in temperatures]:
            cfg = replace(
                base,
                temperature=temperature,
                task=task,
                max_tokens=max_tokens[task],
                seed=1000 if temperature > 0 else None,
            )
            gens = {
                p.label: LoadGenerator(
                    replace(cfg, base_url=p.base_url, model=p.model), clients[p.label]
                )
                for p in (off, on)
            }
            res = TaskResult(task, temperature, {off.label: [], on.label: []})
            for p in (off, on):
                for _ in range(base.warmup):  # fills the prefix cache with the task's prompt
                    await gens[p.label].one(p.model, with_prefix=False)
            for i in range(rounds):
                for p in (off, on) if i % 2 == 0 else (on, off):
                    res.runs[p.label].append(await gens[p.label].one(p.model, with_prefix=False))
            results.append(res)
    return results


def format_ab(results: list[TaskResult], off: str, on: str) -> str:
    head = f"| task | T | {off} decode tok/s | {on} decode tok/s | {on}/{off} | same text |"
    lines = [head, "|---|---:|---:|---:|---:|---|"]
    for r in results:
        a, b = r.decode_tps(off), r.decode_tps(on)
        ratio = f"{b / a:.2f}x" if a and b else "-"
        same = "yes" if r.identical(off, on) else "NO" if r.temperature == 0 else "no"
        lines.append(f"| {r.task} | {r.temperature:g} | {a:.1f} | {b:.1f} | {ratio} | {same} |")
    notes = [
        f"{r.task} T={r.temperature:g}: {len(r.runs[off])} requests each,"
        f" {r.tokens(off):.0f} / {r.tokens(on):.0f} tokens per answer"
        + (f", errors {r.errors(off)} / {r.errors(on)}" if r.errors(off) or r.errors(on) else "")
        for r in results
    ]
    return "\n".join([*lines, "", *notes])
