"""`mlxd`: the command line. Each verb has --help; user errors print one line and exit non-zero.

`run` and the management verbs talk to a running server (MLXD_HOST / MLXD_PORT, default
127.0.0.1:11434) when one answers /health; otherwise they work in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from models import blas
from server import cli_manage, cli_run
from server.client import ClientError, connect
from server.settings import add_flags

EXIT_ERROR = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import serve
    from server.settings import Settings, engine_config, load_settings

    try:
        settings = load_settings(
            args.config, **{n: getattr(args, n) for n in Settings.model_fields}
        )
    except (OSError, ValueError) as e:
        return _fail(f"cannot read the settings: {_one_line(e)}")
    if settings.distributed:
        return _serve_distributed(settings)
    from engine.async_engine import AsyncEngine

    the_engine = AsyncEngine(engine_config(settings))  # the one engine: serve() runs it
    if args.default_model and not the_engine.knows_model(args.default_model):
        known = sorted(s.name for s in the_engine.list_models())
        listing = ", ".join(known) if known else "none (try `mlxd pull` or `mlxd import`)"
        return _fail(f"unknown model '{args.default_model}'; known models: {listing}", EXIT_USAGE)
    return serve(settings, the_engine)


def _serve_distributed(settings: Any) -> int:
    """One rank of `mlx.launch ... -- mlxd serve --distributed MODE`: rank 0 serves HTTP, the
    others run its steps (engine/distributed)."""
    from engine.distributed.group import GroupError, prepare
    from server.settings import engine_config

    try:
        rank = prepare(settings.distributed)
    except GroupError as e:
        return _fail(str(e), EXIT_USAGE)
    config = engine_config(settings)
    if rank != 0:
        from engine.distributed.worker import run_worker
        from server.logging_setup import configure_logging

        configure_logging(settings.log_level)
        return run_worker(config)
    from engine.distributed.engine import DistributedEngine
    from server.app import serve

    return serve(settings, DistributedEngine(config))


def _one_line(e: Exception) -> str:
    """pydantic's multi-line ValidationError as its first problem."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "value"
        return f"{where}: {first.get('msg', 'invalid')}"
    return str(e)


def cmd_doctor(args: argparse.Namespace) -> int:
    from engine.doctor import doctor

    r = doctor(measure=not args.no_bench)
    rows = [
        ("mlx", r.mlx_version),
        ("backend", r.backend),
        ("device", r.device),
        ("blas", f"{r.blas_name}" + (f" ({r.blas_path})" if r.blas_path else "")),
        ("python", r.python),
        ("machine", r.machine),
        ("kernels", r.kernels),
    ]
    if r.gflops is not None:
        rows.append(("fp32 matmul", f"{r.gflops:.1f} GFLOP/s"))
    if r.blas_note:
        rows.append(("note", r.blas_note))
    for key, value in rows:
        print(f"{key:<12} {value}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from bench.cli import main as bench_main

    return int(bench_main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxd", description="Local LLM server on MLX, speaking the OpenAI and Ollama APIs."
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    p = sub.add_parser(
        "serve", help="start the server", description="Every setting of configs/default.toml."
    )
    p.add_argument("--config", help="a TOML file of settings (the tables of default.toml)")
    add_flags(p)
    p.set_defaults(sync=cmd_serve)
    cli_run.add_parser(sub)
    cli_manage.add_parsers(sub)
    p = sub.add_parser("doctor", help="report the MLX backend, device and BLAS, and a matmul speed")
    p.add_argument("--no-bench", action="store_true", help="skip the matmul measurement")
    p.set_defaults(sync=cmd_doctor)
    sub.add_parser("bench", help="benchmarks (see `mlxd bench --help`)", add_help=False)
    return parser


async def _run_verb(args: argparse.Namespace) -> int:
    client = await connect()
    try:
        return await args.func(client, args)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    blas.preload()  # before anything imports mlx: the optimized BLAS takes MLX's cblas calls
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging()
    try:
        if hasattr(args, "sync"):
            return args.sync(args)
        return asyncio.run(_run_verb(args))
    except ClientError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line for the user, the details in the log
        logging.getLogger("mlxd.cli").debug("unexpected error", exc_info=True)
        return _fail(_describe(e))


class _OneLineFormatter(logging.Formatter):
    """Log records as one line each: a CLI user never sees a traceback (MLXD_LOG_LEVEL=debug does)."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return ""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = ""
        return super().format(record).rstrip()


def _setup_logging() -> None:
    debug = os.environ.get("MLXD_LOG_LEVEL", "").lower() == "debug"
    handler = logging.StreamHandler(sys.stderr)
    if not debug:
        handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])


def _describe(e: Exception) -> str:
    try:
        from server.errors import from_exception

        return from_exception(e).message
    except Exception:  # pragma: no cover
        return "unexpected error"


def entry() -> None:
    """The `mlxd` command: main(), then exit without interpreter teardown. Any engine has
    drained and stopped by then, and native libraries' static destructors (MLX's workers, the
    BLAS thread pool) can otherwise abort a clean exit with SIGABRT."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
