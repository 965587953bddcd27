"""`mlxd run MODEL [PROMPT]`: one answer, streamed; or an interactive chat in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from server.cli_manage import progress
from server.client import Client, ClientError

HELP = """Available commands:
  /clear    forget the conversation so far
  /bye      exit
  /?        this help
End a line with \\ to continue on the next one."""


async def _ensure_model(client: Client, model: str) -> None:
    """Like Ollama's run: a model that is not on disk is pulled first."""
    try:
        await client.show(model)
    except ClientError as e:
        if "not found" not in str(e):
            raise
        await progress(client.pull(model))


async def stream_reply(
    client: Client,
    model: str,
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    out: Any,
    parts: list[str] | None = None,
) -> str:
    """Stream one assistant reply to `out`; returns its text (also gathered in `parts`, which
    keeps what was shown when the reply is cancelled)."""
    parts = [] if parts is None else parts
    body = {"model": model, "messages": messages, "options": options}
    if options.get("keep_alive") is not None:
        body["keep_alive"] = options.pop("keep_alive")
    async for event in client.chat(body):
        text = event.get("message", {}).get("content", "")
        if text:
            parts.append(text)
            out.write(text)
            out.flush()
    if parts and not parts[-1].endswith("\n"):
        out.write("\n")
    out.flush()
    return "".join(parts)


def _read_message(prompt: str = ">>> ") -> str | None:
    """One user message (lines ending in a backslash continue); None at end of input."""
    lines: list[str] = []
    while True:
        try:
            line = input(prompt if not lines else "... ")
        except EOFError:
            return None if not lines else "\n".join(lines)
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


async def interactive(client: Client, model: str, options: dict[str, Any]) -> int:
    """The chat loop: /bye or end of input (Ctrl+D) exits. Ctrl+C stops the answer being
    written (as in Ollama) and keeps the session; at the prompt it says how to leave."""
    messages: list[dict[str, Any]] = []
    print("Send a message (/? for help)", file=sys.stderr)
    loop = asyncio.get_running_loop()
    replying: list[asyncio.Future[str]] = []

    def on_interrupt() -> None:
        if replying:
            replying[0].cancel()
        else:
            print("\nUse Ctrl + d or /bye to exit.\n>>> ", end="", flush=True)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        while True:
            text = await asyncio.to_thread(_read_message)
            if text is None or text.strip() == "/bye":
                return 0
            if not text.strip():
                continue
            if text.strip() in ("/?", "/help"):
                print(HELP)
                continue
            if text.strip() == "/clear":
                messages.clear()
                print("Cleared session context")
                continue
            if text.startswith("/"):
                print(f"Unknown command '{text.split()[0]}'. Type /? for help")
                continue
            messages.append({"role": "user", "content": text})
            parts: list[str] = []
            task = asyncio.ensure_future(
                stream_reply(client, model, messages, dict(options), sys.stdout, parts)
            )
            replying.append(task)
            try:
                await asyncio.wait({task})  # returns when the reply ends or is cancelled
            finally:
                replying.clear()
            if task.cancelled():  # Ctrl+C: keep what was shown, stop generating
                print()
            else:
                task.result()  # a failure raises here
            messages.append({"role": "assistant", "content": "".join(parts)})
            print()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def cmd_run(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.seed is not None:
        options["seed"] = args.seed
    if args.num_predict is not None:
        options["num_predict"] = args.num_predict
    if args.keep_alive is not None:
        options["keep_alive"] = args.keep_alive
    await client.prepare()
    await _ensure_model(client, args.model)
    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        prompt = f"{prompt}\n\n{piped}" if prompt else piped
        if not prompt.strip():
            raise ClientError("nothing to send: the prompt is empty")
    if prompt:
        await stream_reply(
            client, args.model, [{"role": "user", "content": prompt}], options, sys.stdout
        )
        return 0
    return await interactive(client, args.model, options)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="chat with a model (interactive without a prompt)")
    p.add_argument("model")
    p.add_argument(
        "prompt", nargs="*", help="send this and print the answer (stdin is read when piped)"
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-predict", type=int, default=None, help="most tokens to generate")
    p.add_argument("--keep-alive", default=None, help="how long the model stays loaded, e.g. 5m")
    p.set_defaults(func=cmd_run, needs_engine=True)
