"""Start a server process and wait until it answers; pick a free loopback port.

The one copy, used by the e2e tests (tests/e2e/conftest.py) and the bench: a process that
exits early or never gets healthy raises ServerFailed with the tail of its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


class ServerFailed(RuntimeError):
    """The server exited before it was ready, or did not get ready in time."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout: float, what: str = "the server"
) -> None:
    """Poll `url` until it answers 200; ServerFailed if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerFailed(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServerFailed(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(0.2)  # polling a starting process: there is no event to wait on


@dataclass
class ServerProcess:
    """A server command on a loopback port, its output in `log_path`. Use `with`, or start()
    and stop(); stop() sends SIGTERM, then SIGKILL after `stop_timeout`."""

    cmd: list[str]
    log_path: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    proc: subprocess.Popen | None = None
    cwd: Path = ROOT  # the source tree the command runs from

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(self.cwd), **self.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_healthy(self.url + self.health_path, self.proc, timeout, " ".join(self.cmd[:4]))
        except ServerFailed as e:
            self.stop()
            raise ServerFailed(f"{e}:\n{self.log_tail()}") from None
        return self

    def stop(self, stop_timeout: float = 30.0) -> int | None:
        """Stop the process (if running); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mlxd_server(
    log_path: Path,
    models_dir: Path | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    root: Path = ROOT,
) -> ServerProcess:
    """`mlxd serve` (this checkout's, or the source tree `root`'s) on a free port, not yet
    started."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if models_dir is not None:
        cmd += ["--models-dir", str(models_dir)]
    return ServerProcess([*cmd, *(args or [])], log_path, port, dict(env or {}), cwd=root)
