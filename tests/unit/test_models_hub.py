"""pull: huggingface_hub's real client against a local stand-in of the hub's routes; offline errors."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from models.errors import ImportFailedError
from models.registry import ModelRegistry
from tests.tiny import make_tiny_model

REPO = "mlx-test/tiny-llama-4bit"
SHA = "0123456789abcdef0123456789abcdef01234567"


class _Hub(BaseHTTPRequestHandler):
    """The routes snapshot_download uses: repo info, tree listing, file resolve (HEAD + GET)."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        info_prefix = f"/api/models/{REPO}/revision/"
        tree_prefix = f"/api/models/{REPO}/tree/"
        resolve_prefix = f"/{REPO}/resolve/"
        if path.startswith(info_prefix):
            siblings = [{"rfilename": f} for f in self.files]
            body = json.dumps({"id": REPO, "sha": SHA, "siblings": siblings}).encode()
            self._send(200, body, {"Content-Type": "application/json"})
        elif path.startswith(tree_prefix):
            tree = [
                {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for f, b in self.files.items()
            ]
            self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        elif path.startswith(resolve_prefix):
            name = path[len(resolve_prefix) :].split("/", 1)[1]
            if name not in self.files:
                self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                return
            data = self.files[name]
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            self._send(200, data, {"X-Repo-Commit": SHA, "ETag": etag})
        else:
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})

    do_GET = _route
    do_HEAD = _route


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[str]:
    src = make_tiny_model(tmp_path / "src", bits=4)
    _Hub.files = {p.name: p.read_bytes() for p in src.iterdir()}
    _Hub.files["README.md"] = b"not wanted"
    _Hub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_pull_from_local_hub_stand_in(hub: str, tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models", memory_limit=1 << 30)
    entry = reg.pull(REPO, endpoint=hub)
    assert entry.name == "tiny-llama-4bit:latest"
    assert entry.bits == 4 and entry.architecture == "llama"
    folder = tmp_path / "models" / "tiny-llama-4bit"
    assert (folder / "model.safetensors").read_bytes() == _Hub.files["model.safetensors"]
    assert not (folder / "README.md").exists()  # only model files are fetched
    assert any(r.startswith("GET /mlx-test/tiny-llama-4bit/resolve/") for r in _Hub.requests)
    lm = reg.acquire("tiny-llama-4bit")
    assert lm.tokenizer.encode("hello") and lm.architecture == "llama"
    with pytest.raises(ImportFailedError, match="already exists"):
        reg.pull(REPO, endpoint=hub)


def test_pull_unknown_repo_is_a_clear_error(hub: str, tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models", memory_limit=1 << 30)
    with pytest.raises(ImportFailedError) as err:
        reg.pull("nobody/nothing", endpoint=hub)
    assert "nobody/nothing" in str(err.value) and "Traceback" not in str(err.value)
    assert list((tmp_path / "models").iterdir()) == []  # nothing half-written is left


def test_pull_offline_says_hub_unreachable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = ModelRegistry(tmp_path / "models", memory_limit=1 << 30)
    with pytest.raises(ImportFailedError, match="cannot reach the model hub"):
        reg.pull("org/model", endpoint=f"http://127.0.0.1:{port}")
    assert list((tmp_path / "models").iterdir()) == []


def test_pull_rejects_names_that_are_neither_bundled_nor_repos(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models", memory_limit=1 << 30)
    with pytest.raises(ImportFailedError, match="neither a bundled model"):
        reg.pull("unknownmodel:7b")
