"""The real `mlxd serve` process over the real default model: `live_server` once per session,
`start_server` for a test's own server (bench/launch.py starts and waits, as for the bench)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.launch import ServerFailed, ServerProcess, mlxd_server

STARTUP_SECONDS = 600.0  # the first run imports the default model on a slow CPU


def _started(server: ServerProcess) -> ServerProcess:
    try:
        return server.start(STARTUP_SECONDS)
    except ServerFailed as e:
        pytest.fail(str(e))


class LiveServer(str):
    """The server's base URL (a str, as tests use it), with its process id for RSS checks."""

    pid: int


@pytest.fixture(scope="session")
def live_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with _started(mlxd_server(log, smollm2_dir.parent)) as server:
        url = LiveServer(server.url)
        url.pid = server.proc.pid
        yield url


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(models_dir, **env): a started server of this test, stopped after it."""
    started: list[ServerProcess] = []

    def start(models_dir: Path, **env: str) -> ServerProcess:
        log = tmp_path / f"server-{len(started)}.log"
        started.append(_started(mlxd_server(log, models_dir, env=env)))
        return started[-1]

    yield start
    for server in started:
        server.stop()
