"""`mlxd bench`: measure an OpenAI-compatible server, or two side by side.

mlxd bench --url http://127.0.0.1:11434 --concurrency 1,4,16 --max-tokens 64 --json out.json
mlxd bench --url URL_A --compare URL_B --label mlxd --label mlx-lm
mlxd bench --profile [--rows 1,4,16]   (where a decode step's time goes, model in-process)
mlxd bench --profile --prefill 512,1024,2048 --steps 2   (where a long prefill's time goes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

from bench.compare import format_comparison, format_result
from bench.loadgen import BenchResult, LoadConfig, LoadGenerator


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "concurrency is a comma-separated list of integers"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxd bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:11434", help="base URL of server A")
    p.add_argument("--model", default="", help="model name (default: the first one listed)")
    p.add_argument("--compare", metavar="URL2", help="also run the same load against URL2")
    p.add_argument("--compare-model", default="", help="model name on URL2 (default: --model)")
    p.add_argument("--label", action="append", default=[], help="names of A and B (repeat)")
    p.add_argument("--concurrency", type=_levels, default=[1, 4, 16], help="e.g. 1,4,16")
    p.add_argument("--requests", type=int, default=0, help="per level (default 2 x conc, min 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="approximate user prompt length")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per request")
    p.add_argument("--shared-prefix", action="store_true", help="a long shared system prompt")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="its approximate length")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default="", help="bearer token, if the server needs one")
    p.add_argument(
        "--constrained", type=float, default=0.0, help="fraction of requests with a JSON schema"
    )
    p.add_argument(
        "--compare-constrained",
        type=float,
        metavar="F",
        help="B is the same load with this fraction constrained (on URL2, else on --url)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument(
        "--temperature", type=float, help="sampling temperature (default: 0.7; --profile: 0)"
    )
    prof = p.add_argument_group("--profile: a decode step's time by op class, in-process")
    prof.add_argument("--profile", action="store_true", help="profile instead of load testing")
    prof.add_argument("--rows", type=_levels, default=[1, 4, 16], help="batch sizes, e.g. 1,4,16")
    prof.add_argument("--context", type=int, default=128, help="tokens already in each row's KV")
    prof.add_argument("--steps", type=int, default=8, help="measured decode steps per batch size")
    prof.add_argument(
        "--prefill",
        type=_levels,
        metavar="N,N",
        help="profile one prompt's prefill of each of these lengths instead (--steps: repeats)",
    )
    return p


async def _run(cfg: LoadConfig, label: str) -> BenchResult:
    print(f"benchmarking {label} at {cfg.base_url} ...", file=sys.stderr, flush=True)
    return await LoadGenerator(cfg).run(label)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table (and writes JSON). Returns 0, 1 on any failed request,
    2 when a server could not be reached."""
    args = build_parser().parse_args(argv)
    if args.profile:
        import models  # noqa: F401  (loads the fast BLAS, which must precede mlx)
        from bench.profile import run as profile  # imports mlx and the model: only here

        args.temperature = args.temperature or 0.0
        print(profile(args))
        return 0
    labels = args.label + ["A", "B"][len(args.label) :]
    cfg = LoadConfig(
        base_url=args.url.rstrip("/"),
        model=args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        shared_prefix=args.shared_prefix,
        prefix_tokens=args.prefix_tokens,
        warmup=args.warmup,
        timeout=args.timeout,
        api_key=args.api_key,
        constrained=args.constrained,
        temperature=0.7 if args.temperature is None else args.temperature,
    )
    results: list[BenchResult] = []
    try:
        results.append(asyncio.run(_run(cfg, labels[0])))
        if args.compare or args.compare_constrained is not None:
            other = replace(
                cfg,
                base_url=(args.compare or args.url).rstrip("/"),
                model=args.compare_model or args.model,
                constrained=(
                    cfg.constrained
                    if args.compare_constrained is None
                    else args.compare_constrained
                ),
            )
            results.append(asyncio.run(_run(other, labels[1])))
    except Exception as e:  # unreachable server, no models: one line, no traceback
        print(f"mlxd bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if len(results) == 2:
        print(format_comparison(results[0], results[1]))
    else:
        print(format_result(results[0]))
    if args.json:
        payload = {"results": [r.to_json() for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    failed = sum(lv.errors for r in results for lv in r.levels)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
