"""`mlxd list|ps|show|pull|create|import|rm|cp|stop`: model management verbs of the CLI."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from server.client import Client


def human_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ago(stamp: str) -> str:
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return ""
    secs = (datetime.now(timezone.utc) - then).total_seconds()
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if secs >= size:
            k = int(secs // size)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def _until(stamp: str) -> str:
    if stamp.startswith("2318"):
        return "Forever"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return ""
    secs = max((then - datetime.now(timezone.utc)).total_seconds(), 0)
    return f"{int(secs // 60)} minutes from now" if secs >= 60 else f"{int(secs)} seconds from now"


def table(rows: list[list[str]], out: Any = None) -> None:
    out = out or sys.stdout
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


async def progress(events: AsyncIterator[dict[str, Any]]) -> None:
    """Show a progress stream: a tqdm bar per step that reports totals, a line for the others."""
    bars: dict[str, tqdm] = {}
    try:
        async for e in events:
            status = str(e.get("status", ""))
            total = e.get("total")
            if total:
                bar = bars.get(status)
                if bar is None:
                    bar = bars[status] = tqdm(total=total, desc=status, unit="", file=sys.stderr)
                bar.update(int(e.get("completed", 0)) - bar.n)
            elif status:
                print(status, file=sys.stderr)
    finally:
        for bar in bars.values():
            bar.close()


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    models = (await client.tags())["models"]
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    rows += [
        [m["name"], (m.get("digest") or "")[:12], human_size(m["size"]), _ago(m["modified_at"])]
        for m in models
    ]
    table(rows)
    return 0


async def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    models = (await client.ps())["models"]
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        where = "100% GPU" if m.get("size_vram") else "100% CPU"
        ctx = str(m.get("context_length", ""))
        rows.append(
            [
                m["name"],
                (m.get("digest") or "")[:12],
                human_size(m["size"]),
                where,
                ctx,
                _until(m["expires_at"]),
            ]
        )
    table(rows)
    return 0


async def cmd_show(client: Client, args: argparse.Namespace) -> int:
    info = await client.show(args.model)
    if args.template:
        print(info.get("template", ""))
        return 0
    if args.parameters:
        print(info.get("parameters", ""))
        return 0
    if args.modelfile:
        print(info.get("modelfile", ""))
        return 0
    d, mi = info.get("details", {}), info.get("model_info", {})
    arch = mi.get("general.architecture", d.get("family", ""))
    print("  Model")
    table(
        [
            ["    architecture", str(arch)],
            ["    parameters", str(d.get("parameter_size", ""))],
            ["    context length", str(mi.get(f"{arch}.context_length", ""))],
            ["    quantization", str(d.get("quantization_level", ""))],
            ["    format", str(d.get("format", ""))],
        ]
    )
    if info.get("capabilities"):
        print("\n  Capabilities")
        for c in info["capabilities"]:
            print(f"    {c}")
    return 0


async def cmd_pull(client: Client, args: argparse.Namespace) -> int:
    await progress(client.pull(args.model))
    return 0


async def cmd_create(client: Client, args: argparse.Namespace) -> int:
    start = time.monotonic()
    await progress(client.create(args.name, args.source))
    print(f"created '{args.name}' in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return 0


async def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    for name in args.models:
        await client.delete(name)
        print(f"deleted '{name}'")
    return 0


async def cmd_cp(client: Client, args: argparse.Namespace) -> int:
    await client.copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


async def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    await client.stop(args.model)
    return 0


def add_parsers(sub: Any) -> None:
    """Register the management verbs on the CLI's subparsers."""
    p = sub.add_parser("list", aliases=["ls"], help="list the models on disk")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("ps", help="list the models loaded in the running server")
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("show", help="show a model's details")
    p.add_argument("model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--template", action="store_true", help="print the chat template only")
    g.add_argument("--parameters", action="store_true", help="print the parameters only")
    g.add_argument("--modelfile", action="store_true", help="print a Modelfile for the model")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("pull", help="fetch a model (a hub repo id, or a bundled model offline)")
    p.add_argument("model")
    p.set_defaults(func=cmd_pull, needs_engine=True)
    p = sub.add_parser("import", help="import a GGUF file or a safetensors folder")
    p.add_argument("source", metavar="FILE", help="a .gguf file or a safetensors folder")
    p.add_argument("--name", required=True, help="the name to give the model")
    p.set_defaults(func=cmd_create, needs_engine=True)
    p = sub.add_parser("create", help="create a model from a GGUF file, folder or model")
    p.add_argument("name")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="PATH",
        help="a .gguf file, a safetensors folder or a model name",
    )
    p.set_defaults(func=cmd_create, needs_engine=True)
    p = sub.add_parser("rm", help="delete models")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.set_defaults(func=cmd_rm)
    p = sub.add_parser("cp", help="copy a model under a new name")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("stop", help="unload a model from the running server")
    p.add_argument("model")
    p.set_defaults(func=cmd_stop)
