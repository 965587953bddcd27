"""Ollama's blob store: `HEAD /api/blobs/<digest>` and `POST /api/blobs/<digest>`.

A client uploads a model file as a blob named by its SHA-256, then creates a model from it
(`/api/create` with `files: {"name.gguf": "sha256:<hex>"}`), so a model file reaches the server
without the server ever opening a path a client chose. Blobs live in `<models_dir>/.blobs`; an
upload is written to a temporary file, hashed as it arrives, and kept only if it matches the
digest in its URL. A blob is removed once a create has imported it (mlxd converts a model into
its own folder, where Ollama keeps blobs as the model's layers: a kept copy would be waste),
unless another create in progress reads it; after a failed create it stays, for a retry.
Clients check with HEAD and upload again when a blob is missing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, Response

from server.errors import APIError

router = APIRouter()

_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_SPARE_BYTES = 256 * 1024 * 1024  # an upload never fills the disk to its last bytes


def blobs_dir(models_dir: str | Path) -> Path:
    return Path(models_dir).expanduser() / ".blobs"  # hidden: never scanned as a model


def parse_digest(digest: str) -> str:
    """The hex of a `sha256:<64 hex>` digest (Ollama also writes `sha256-`); 400 otherwise."""
    m = _DIGEST.match(digest)
    if m is None:
        raise APIError(400, "invalid digest: expected sha256:<64 lowercase hex digits>")
    return m.group(1)


def blob_path(models_dir: str | Path, digest: str) -> Path:
    """Where the blob of `digest` is (or would be) stored."""
    return blobs_dir(models_dir) / f"sha256-{parse_digest(digest)}"


class BlobRefs:
    """The blobs that creates in progress read (on the event loop: no lock needed)."""

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}

    def hold(self, paths: set[Path]) -> None:
        for p in paths:
            self._held[p] = self._held.get(p, 0) + 1

    def release(self, paths: set[Path], imported: bool) -> None:
        """A create is over; once `imported`, blobs no other create holds are removed."""
        for p in paths:
            left = self._held.get(p, 1) - 1
            if left > 0:
                self._held[p] = left
                continue
            self._held.pop(p, None)
            if imported:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


PENDING = BlobRefs()


def _models_dir(request: Request) -> Path:
    return Path(request.app.state.settings.models_dir).expanduser()


@router.head("/api/blobs/{digest}")
async def head_blob(request: Request, digest: str) -> Response:
    """200 when the server holds the blob, 404 when it must be uploaded."""
    path = blob_path(_models_dir(request), digest)
    if not path.is_file():
        raise APIError(404, f"blob {digest} not found")
    return Response(status_code=200)


@router.post("/api/blobs/{digest}")
async def upload_blob(request: Request, digest: str) -> Response:
    """Store the request body as the blob of `digest` (201), or 400 if its hash differs."""
    dest = blob_path(_models_dir(request), digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    length = request.headers.get("content-length", "")
    free = shutil.disk_usage(dest.parent).free
    if length.isdigit() and int(length) > free - _SPARE_BYTES:
        raise APIError(507, "not enough disk space on the server for this blob")
    expected = parse_digest(digest)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=dest.parent)
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                sha.update(chunk)
                f.write(chunk)
        if sha.hexdigest() != expected:
            raise APIError(400, f"digest mismatch: the body's sha256 is {sha.hexdigest()}")
        os.replace(tmp, dest)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise APIError(507, "not enough disk space on the server for this blob") from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return Response(status_code=201)
