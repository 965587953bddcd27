"""`make bench`: mlxd, mlx-lm's server and llama.cpp's server under the same load, one table.

Steps: build llama.cpp's `llama-server` once (cached under ~/.cache/mlxd/llama.cpp/<version>);
start `mlxd serve` on a free port (the default model, imported on first run); save a dequantized
fp32 copy of that model for mlx-lm (cached under .bench/) and start `python -m mlx_lm server`
with the same BLAS preloaded; start `llama-server` on the model's own GGUF file (-np 16 -t 2);
run every protocol (greedy and T=0.7) at every concurrency level on each server in turn; stop all
three. Results: .bench/results.json and .bench/results.md.

    python scripts/bench_compare.py [--servers mlxd,llama.cpp,mlx-lm] [--temperatures 0,0.7]
        [--concurrency 1,4,16] [--max-tokens 64] [--requests N] [--warmup 2]

`make bench-long` (--long-prompts 512,1024,2048): time to first token on long prompts (chat UIs
send long system prompts and histories), mlxd and llama.cpp side by side, greedy, 1 and 4
streams, 8 tokens each; results in .bench/long_prompts.md and .json.

`make bench-spec` (--speculative): mlxd with speculative decoding off against auto instead, one
stream, greedy and T=0.7 (--temperatures), on the chat prompts and on a copy-this-text task
(bench/spec.py); results in .bench/speculative.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".bench"
sys.path.insert(0, str(ROOT))

from bench import llamacpp  # noqa: E402
from bench.launch import ServerProcess, free_port, mlxd_server  # noqa: E402
from bench.loadgen import LoadConfig  # noqa: E402
from bench.spec import format_ab, run_ab  # noqa: E402
from bench.suite import Peer, format_suite, format_ttft, run_suite  # noqa: E402

SERVERS = ("mlxd", "llama.cpp", "mlx-lm")


def mkl_path() -> str | None:
    """The MKL that models/blas.py preloads in our server, for mlx-lm's server too."""
    for prefix in {sys.prefix, sys.base_prefix}:
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    return None


def prepare_mlxlm_copy(src: Path, dst: Path) -> None:
    """Save an fp32, dequantized, mlx-lm-loadable copy of `src` at `dst` (in a child process,
    so this orchestrator never imports mlx)."""
    if (dst / "config.json").exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    code = (
        "import models, sys\n"  # BLAS first, as everywhere
        "import mlx.core as mx\n"
        "from mlx.utils import tree_map\n"
        "from mlx_lm.utils import load, dequantize_model, save\n"
        "src, dst = sys.argv[1], sys.argv[2]\n"
        "model, tok, config = load(src, return_config=True)\n"
        "model = dequantize_model(model)\n"
        "model.update(tree_map(lambda a: a.astype(mx.float32)"
        " if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))\n"
        "config.pop('quantization', None); config.pop('quantization_config', None)\n"
        "config['torch_dtype'] = 'float32'\n"
        "save(dst, src, model, tok, config)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp)], check=True, cwd=ROOT)
    tmp.rename(dst)


def _list(kind: type, text: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="our model name (default: the configured default)")
    p.add_argument("--servers", default=",".join(SERVERS), help="a subset of " + ",".join(SERVERS))
    p.add_argument("--temperatures", type=lambda s: _list(float, s))
    p.add_argument("--concurrency", type=lambda s: _list(int, s))
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument(
        "--long-prompts",
        type=lambda s: _list(int, s),
        metavar="N,N",
        help="TTFT on prompts of about these many tokens instead (greedy, 8-token answers"
        " unless --temperatures / --max-tokens say otherwise)",
    )
    p.add_argument("--requests", type=int, default=0, help="per level (default 2 x conc, min 8)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server first")
    p.add_argument(
        "--no-structured",
        dest="structured",
        action="store_false",
        help="skip the table of mlxd with half the requests under a JSON schema",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="A/B mlxd with speculative decoding off and auto (1 stream, --temperatures) instead",
    )
    p.add_argument("--rounds", type=int, default=4, help="--speculative: requests per task each")
    p.add_argument("--llama-server", type=Path, help="use this llama-server binary (no build)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    long = bool(args.long_prompts)
    # Defaults by mode: the decode suite, or first tokens of long prompts.
    if args.temperatures is None:
        args.temperatures = [0.0] if long else [0.0, 0.7]
    if args.concurrency is None:
        args.concurrency = [1, 4] if long else [1, 4, 16]
    if args.max_tokens is None:
        args.max_tokens = 8 if long else 64
    if long and min(args.long_prompts) < 1:
        p.error("--long-prompts lengths must be positive")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown or not args.servers:
        p.error(f"--servers takes names among {', '.join(SERVERS)}")
    if min(args.concurrency, default=0) < 1:
        p.error("--concurrency levels must be positive integers")
    return args


def _start(stack: contextlib.ExitStack, server: ServerProcess, timeout: float) -> str:
    """Start `server` (stopped when the stack closes, failed start or not); its base URL."""
    stack.callback(server.stop)
    server.start(timeout)
    return server.url


def _mlxd(stack: contextlib.ExitStack, name: str, timeout: float) -> Peer:
    server = mlxd_server(OUT / "mlxd.log", args=["--model", name])
    print(f"starting mlxd on port {server.port} (the first run imports {name}) ...", flush=True)
    url = _start(stack, server, timeout)
    # Load the model (importing it on first use) before anything looks for its folder.
    body = {"model": name, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
    httpx.post(url + "/api/generate", json=body, timeout=timeout).raise_for_status()
    return Peer("mlxd", url, name)


def _mlx_lm(stack: contextlib.ExitStack, name: str, timeout: float) -> Peer:
    from models.names import model_dir  # no mlx: names only
    from server.settings import load_settings

    src = model_dir(load_settings().models_dir, name)
    if not (src / "config.json").exists():
        raise RuntimeError(f"model {name} is not in the models directory (start mlxd first)")
    dst = OUT / f"mlxlm-{src.name}-fp32"
    print(f"preparing an fp32 copy for mlx-lm at {dst} ...", flush=True)
    prepare_mlxlm_copy(src, dst)
    mkl = mkl_path()
    # The same BLAS as ours: compare servers, not BLAS libraries.
    env = {"LD_PRELOAD": mkl} if mkl else {}
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(dst), "--port", str(port)]
    print(f"starting mlx-lm server on port {port} ...", flush=True)
    url = _start(stack, ServerProcess(cmd, OUT / "mlx_lm.log", port, env), timeout)
    return Peer("mlx-lm", url, "default_model")


def _llama(
    stack: contextlib.ExitStack, gguf: Path, binary: Path, timeout: float, slot_ctx: int
) -> Peer:
    port = free_port()
    cmd = llamacpp.server_command(binary, gguf, port, slots=16, threads=2, slot_ctx=slot_ctx)
    print(f"starting llama-server on port {port} ({binary}) ...", flush=True)
    url = _start(stack, ServerProcess(cmd, OUT / "llama_server.log", port), timeout)
    return Peer("llama.cpp", url, "smollm2")


def _structured(mlxd: Peer, args: argparse.Namespace) -> int:
    """Structured output inside the batch: the same load on mlxd, half the requests answering
    under a JSON schema, against none."""
    from bench.cli import main as bench_main

    print("mlxd with half the requests constrained by a JSON schema:", flush=True)
    levels = ",".join(str(c) for c in args.concurrency)
    return bench_main(
        [
            "--url", mlxd.base_url, "--model", mlxd.model,
            "--compare-constrained", "0.5",
            "--label", "free", "--label", "half constrained",
            "--concurrency", levels, "--max-tokens", str(args.max_tokens),
            "--requests", str(args.requests), "--warmup", str(args.warmup),
            "--json", str(OUT / "structured.json"),
        ]
    )  # fmt: skip


def machine() -> str:
    """The CPU this run measured (numbers from another machine do not compare)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        simd = [
            f
            for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
            if f" {f}" in flags
        ]
        model += f" ({', '.join(simd) or 'no AVX2'})"
    return f"{model}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


def speculative_ab(name: str, args: argparse.Namespace) -> int:
    """`make bench-spec`: two mlxd servers, speculation off and auto, requests alternating."""
    with contextlib.ExitStack() as stack:
        peers = []
        for mode in ("off", "auto"):
            server = mlxd_server(
                OUT / f"mlxd-spec-{mode}.log",
                args=["--model", name],
                env={"MLXD_SPECULATIVE": mode},
            )
            print(f"starting mlxd (speculative {mode}) on port {server.port} ...", flush=True)
            url = _start(stack, server, args.startup_timeout)
            body = {"model": name, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
            httpx.post(url + "/api/generate", json=body, timeout=args.startup_timeout)
            peers.append(Peer(f"spec {mode}", url, name))
        base = LoadConfig(base_url="", prompt_tokens=args.prompt_tokens, warmup=args.warmup)
        tokens = {"chat": args.max_tokens, "repeat": 400}
        load_before = os.getloadavg()
        temperatures = tuple(args.temperatures)
        results = asyncio.run(run_ab(peers[0], peers[1], base, args.rounds, tokens, temperatures))
        load_after = os.getloadavg()
    load = (
        f"load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)}, "
        f"after: {' / '.join(f'{x:.1f}' for x in load_after)}"
    )
    table = f"{machine()}\n\n{format_ab(results, 'spec off', 'spec auto')}\n{load}"
    print(table, flush=True)
    (OUT / "speculative.md").write_text(table + "\n")
    failed = sum(r.errors(p.label) for r in results for p in peers)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from models.default import bundled_gguf
    from server.settings import load_settings

    name = args.model or load_settings().default_model
    OUT.mkdir(exist_ok=True)
    if args.speculative:
        return speculative_ab(name, args)
    gguf = bundled_gguf(name) if "llama.cpp" in args.servers else None
    if "llama.cpp" in args.servers and gguf is None:
        print(
            f"make bench: llama.cpp needs a bundled GGUF model; {name} is not one", file=sys.stderr
        )
        return 2
    # Build before any server runs: the compile would otherwise share the cores with them.
    binary = args.llama_server or (llamacpp.ensure_server() if gguf else None)
    t = args.startup_timeout
    with contextlib.ExitStack() as stack:
        started = {}
        if "mlxd" in args.servers or "mlx-lm" in args.servers:
            started["mlxd"] = _mlxd(stack, name, t)  # mlx-lm's copy comes from its import
        if "mlx-lm" in args.servers:
            started["mlx-lm"] = _mlx_lm(stack, name, t)
        if gguf is not None and binary is not None:
            # Each slot holds a whole prompt and its answer (the filler prompts run ~1.2x the
            # asked length in SmolLM2's vocabulary).
            longest = max(args.long_prompts or [args.prompt_tokens])
            slot_ctx = max(1024, 2 * longest + args.max_tokens)
            started["llama.cpp"] = _llama(stack, gguf, binary, t, slot_ctx)
        peers = [started[s] for s in SERVERS if s in args.servers]
        base = LoadConfig(
            base_url="",
            concurrency=args.concurrency,
            requests=args.requests,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            warmup=args.warmup,
        )
        load_before = os.getloadavg()[0]
        labels = ", ".join(p.label for p in peers)
        print(
            f"benchmarking {labels}: temperatures {args.temperatures}, streams {args.concurrency}"
        )
        result = asyncio.run(run_suite(peers, base, args.temperatures, None, args.long_prompts))
        after = os.getloadavg()[0]
        load = f"load average (1 min) before / after the run: {load_before:.1f} / {after:.1f}"
        shown = format_ttft(result) if args.long_prompts else format_suite(result)
        table = f"{machine()}\n\n{shown}\n{load}"
        print(table, flush=True)
        stem = "long_prompts" if args.long_prompts else "results"
        (OUT / f"{stem}.md").write_text(table + "\n")
        (OUT / f"{stem}.json").write_text(json.dumps(result.to_json(), indent=2))
        code = 0
        if "mlxd" in args.servers and args.structured and not args.long_prompts:
            code = _structured(started["mlxd"], args)
    # The exit code speaks for mlxd; a peer's errors (mlx-lm's server drops connections at 16
    # streams) are printed under the table and do not fail the run.
    failed = sum(lv.errors for r in result.rows for k, lv in r.levels.items() if k == "mlxd")
    return 1 if failed else code


if __name__ == "__main__":
    raise SystemExit(main())
