"""Start a server process, wait until its health URL answers, stop it: one helper for the bench's
servers (mlxd, mlx-lm, llama.cpp) and any test fixture that needs a real server."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, name: str, log: Path) -> None:
    """Poll `url` until it answers 200; raise ServerStartError early if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(f"{name} exited with code {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ServerStartError(f"{name} not healthy after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.2)  # polling a starting process: there is no event to wait on


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM this one process, SIGKILL it if it outlives `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def launched(
    cmd: list[str],
    health_url: str,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600.0,
    name: str = "server",
) -> Iterator[subprocess.Popen]:
    """Run `cmd` (output to `log`) for the block, once `health_url` answers 200; always stopped."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(health_url, proc, timeout, name, log)
        yield proc
    finally:
        stop(proc)
