"""Several servers under the same load, interleaved, and one table of the results with ratios.

For every protocol (a sampling temperature) and concurrency level, each server in turn runs the
same level before the next level starts, so a noisy neighbour on a shared machine slows all of
them about equally: the ratios are what the bench is for.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx

from bench.loadgen import LevelResult, LoadConfig, LoadGenerator


@dataclass(frozen=True)
class Peer:
    """A server under test: a label for the table, its base URL, the model name it serves."""

    label: str
    base_url: str
    model: str = ""


@dataclass
class SuiteRow:
    temperature: float
    concurrency: int
    levels: dict[str, LevelResult]  # by peer label
    prompt_tokens: int = 0  # the asked (approximate) prompt length; 0: the base config's


@dataclass
class SuiteResult:
    labels: list[str]
    config: dict[str, Any]
    rows: list[SuiteRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def protocol_name(temperature: float) -> str:
    return "greedy" if temperature == 0 else f"T={temperature:g}"


async def run_suite(
    peers: list[Peer],
    base: LoadConfig,
    temperatures: list[float],
    clients: dict[str, httpx.AsyncClient] | None = None,
    prompt_lengths: list[int] | None = None,
) -> SuiteResult:
    """Warm each server up, then run every (temperature, prompt length, level) on each server
    in turn (`prompt_lengths`: approximate prompt tokens, default the base config's)."""
    lengths = prompt_lengths or [base.prompt_tokens]
    config = {**asdict(base), "temperatures": temperatures, "prompt_lengths": lengths}
    result = SuiteResult([p.label for p in peers], config)
    async with contextlib.AsyncExitStack() as stack:
        conns = dict(clients or {})
        limits = httpx.Limits(max_connections=max(base.concurrency) + 4)
        for p in peers:
            if p.label not in conns:
                client = httpx.AsyncClient(base_url=p.base_url, timeout=base.timeout, limits=limits)
                conns[p.label] = await stack.enter_async_context(client)
        gens: dict[str, LoadGenerator] = {}
        for t in temperatures:
            models = {}
            for p in peers:
                cfg = replace(base, base_url=p.base_url, model=p.model, temperature=t)
                # Numbering continues across protocols: no prompt repeats, so no server's
                # prompt cache serves a later protocol from an earlier one.
                start = gens[p.label].sent if p.label in gens else 0
                gen = gens[p.label] = LoadGenerator(cfg, conns[p.label], start)
                models[p.label] = p.model or await gen.first_model()
                for _ in range(base.warmup):
                    await gen.one(models[p.label], with_prefix=False)
            for n, c in [(n, c) for n in lengths for c in base.concurrency]:
                row = SuiteRow(t, c, {}, n)
                for p in peers:
                    gen = gens[p.label]
                    gen.cfg = replace(gen.cfg, prompt_tokens=n)
                    lv = row.levels[p.label] = await gen.level(models[p.label], c)
                    where = f"{protocol_name(t)}, ~{n}-token prompts, {c} streams"
                    print(
                        f"  {where}: {p.label} {lv.tokens_per_s:.1f} tok/s, TTFT p50"
                        f" {lv.ttft_p50 * 1e3:.0f} ms",
                        file=sys.stderr,
                    )
                result.rows.append(row)
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _triple(levels: list[LevelResult | None], attr: str, fmt: str) -> str:
    return " / ".join("-" if lv is None else fmt.format(getattr(lv, attr) * 1e3) for lv in levels)


def format_suite(result: SuiteResult, ours: str = "mlxd") -> str:
    """A markdown table: a row per (protocol, streams); tok/s per server, ratios of `ours` to each
    other server (tok/s: above 1 is faster; TTFT p50: below 1 is faster), latencies per server."""
    labels = result.labels
    others = [x for x in labels if x != ours] if ours in labels else []
    names = " / ".join(labels)
    head = ["protocol", "streams", *(f"{x} tok/s" for x in labels)]
    head += [f"{ours}/{x} tok/s" for x in others] + [f"{ours}/{x} TTFT p50" for x in others]
    head += [f"TTFT p50 ms ({names})", f"TTFT p95 ms ({names})", f"ITL p50 ms ({names})"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for row in result.rows:
        lvs = [row.levels.get(x) for x in labels]
        cells = [protocol_name(row.temperature), str(row.concurrency)]
        cells += ["-" if lv is None else f"{lv.tokens_per_s:.1f}" for lv in lvs]
        mine = row.levels.get(ours)
        for attr in ("tokens_per_s", "ttft_p50"):
            for x in others:
                theirs = row.levels.get(x)
                ok = mine is not None and theirs is not None
                cells.append(_ratio(getattr(mine, attr), getattr(theirs, attr)) if ok else "-")
        cells += [_triple(lvs, "ttft_p50", "{:.0f}"), _triple(lvs, "ttft_p95", "{:.0f}")]
        cells.append(_triple(lvs, "itl_p50", "{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _notes(result))


def _notes(result: SuiteResult) -> list[str]:
    """Output tokens per request (a server that ignores `ignore_eos` may stop early) and errors."""
    per_req, errors = [], []
    for x in result.labels:
        tokens = done = 0
        for r in result.rows:
            lv = r.levels.get(x)
            if lv is None:
                continue
            tokens, done = tokens + lv.output_tokens, done + lv.requests - lv.errors
            if lv.errors:
                where = f"{protocol_name(r.temperature)}, {r.concurrency} streams"
                errors.append(f"{x} ({where}): {lv.errors} errors, e.g. {lv.error_sample}")
        per_req.append(f"{x} {tokens / done:.1f}" if done else f"{x} -")
    return ["", "output tokens per request: " + ", ".join(per_req), *errors]


def format_ttft(result: SuiteResult, ours: str = "mlxd") -> str:
    """Long prompts: a row per (prompt length, streams); TTFT p50 per server and the ratio of
    `ours` to each other (below 1 is faster), and prompt tokens over TTFT p50 (with one stream
    the prefill's tokens/s; with more, each request's prompt over its wait, queueing included)."""
    labels = result.labels
    others = [x for x in labels if x != ours] if ours in labels else []
    names = " / ".join(labels)
    head = ["protocol", "prompt tokens", "streams", f"TTFT p50 ms ({names})"]
    head += [f"{ours}/{x} TTFT p50" for x in others]
    head += [f"prompt tok/s at TTFT p50 ({names})", f"TTFT p95 ms ({names})"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for row in result.rows:
        lvs = [row.levels.get(x) for x in labels]
        # What the servers counted (chat template included), else the asked length.
        counted = [lv.prompt_tokens for lv in lvs if lv is not None and lv.prompt_tokens]
        tokens = counted[0] if counted else float(row.prompt_tokens)
        cells = [protocol_name(row.temperature), f"{tokens:.0f}", str(row.concurrency)]
        cells.append(_triple(lvs, "ttft_p50", "{:.0f}"))
        mine = row.levels.get(ours)
        for x in others:
            theirs = row.levels.get(x)
            ok = mine is not None and theirs is not None
            cells.append(_ratio(mine.ttft_p50, theirs.ttft_p50) if ok else "-")  # type: ignore[union-attr]
        rates = [
            "-"
            if lv is None or not lv.ttft_p50
            else f"{(lv.prompt_tokens or tokens) / lv.ttft_p50:.0f}"
            for lv in lvs
        ]
        cells += [" / ".join(rates), _triple(lvs, "ttft_p95", "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _notes(result))
