"""`mlxd run` end to end: one-shot (in-process engine, no server) and interactive through a pty."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2:135m"


def _env(models_dir: Path) -> dict[str, str]:
    # A port nothing listens on: the CLI must fall back to the in-process engine.
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLXD_MODELS": str(models_dir), "MLXD_PORT": "1"}


def test_run_one_shot_answers(smollm2_dir: Path):
    cmd = [sys.executable, "-m", "server.cli", "run", MODEL, "What is the capital of France?"]
    r = subprocess.run(
        [*cmd, "--temperature", "0"],
        cwd=ROOT,
        env=_env(smollm2_dir.parent),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert "Traceback" not in r.stderr


def test_user_error_is_one_line(smollm2_dir: Path):
    cmd = [sys.executable, "-m", "server.cli", "rm", "no-such-model:1"]
    r = subprocess.run(
        cmd, cwd=ROOT, env=_env(smollm2_dir.parent), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


class Pty:
    """A child process on a pseudo-terminal, read until expected text appears."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.master, slave = pty.openpty()
        # A session of its own with the pty as controlling terminal, so ^C written to the
        # terminal reaches the child as SIGINT, as in a real terminal.
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 300.0, start: int = 0) -> str:
        """Wait until `text` appears in the output after offset `start`."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[start:]:
            left = deadline - time.monotonic()
            if (
                left <= 0
                or self.proc.poll() is not None
                and not select.select([self.master], [], [], 0)[0]
            ):
                raise AssertionError(f"did not see {text!r}; output so far:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    pass
        return self.seen

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def interrupt(self) -> None:
        """Ctrl+C, typed on the terminal."""
        os.write(self.master, b"\x03")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


def test_run_interactive_through_a_pty(smollm2_dir: Path):
    argv = [sys.executable, "-m", "server.cli", "run", MODEL, "--temperature", "0"]
    term = Pty(argv, _env(smollm2_dir.parent))
    try:
        term.expect(">>> ")
        mark = len(term.seen)
        term.send("What is the capital of France?")
        term.expect(">>> ", timeout=300, start=mark)
        assert "Paris" in term.seen[mark:]
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()


def test_ctrl_c_stops_the_answer_not_the_program(smollm2_dir: Path):
    """Ollama's behaviour: ^C while an answer is written stops that answer and gives the prompt
    back; the conversation goes on."""
    argv = [sys.executable, "-m", "server.cli", "run", MODEL, "--temperature", "0"]
    term = Pty(argv, _env(smollm2_dir.parent))
    try:
        term.expect(">>> ")
        mark = len(term.seen)
        term.send("Write a very long story about a dragon and a knight, in ten chapters.")
        term.expect("dragon", timeout=300, start=mark + 80)  # the answer is being written
        term.interrupt()
        mark = len(term.seen)
        term.expect(">>> ", timeout=60, start=mark)
        assert term.proc.poll() is None, term.seen[-2000:]
        mark = len(term.seen)
        term.send("What is the capital of France?")
        term.expect(">>> ", timeout=300, start=mark)
        assert "Paris" in term.seen[mark:]
        term.send("/bye")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()


@pytest.mark.parametrize("verb", [["ps"], ["stop", MODEL]])
def test_ps_and_stop_without_a_server_say_so(smollm2_dir: Path, verb: list[str]):
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", *verb],
        cwd=ROOT,
        env=_env(smollm2_dir.parent),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "no mlxd server is running at http://127.0.0.1:1" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_import_uploads_to_a_running_server(live_server: str, tmp_path: Path):
    """`mlxd import FILE` with a server up: the file goes over as a blob (the server, whose
    import_dirs is empty, never opens the user's path) and the model is served."""
    import hashlib
    from urllib.parse import urlparse

    import httpx

    from models.default import bundled_gguf

    gguf = tmp_path / "copy.gguf"
    gguf.symlink_to(bundled_gguf(MODEL))
    port = str(urlparse(live_server).port)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLXD_HOST": "127.0.0.1", "MLXD_PORT": port}
    cmd = [sys.executable, "-m", "server.cli", "import", str(gguf), "--name", "uploaded:1"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        # Imported, the upload is removed: the model folder holds its own copy.
        assert httpx.head(f"{live_server}/api/blobs/sha256:{digest}").status_code == 404
        names = [m["name"] for m in httpx.get(live_server + "/api/tags").json()["models"]]
        assert "uploaded:1" in names
    finally:
        httpx.request("DELETE", live_server + "/api/delete", json={"model": "uploaded:1"})
