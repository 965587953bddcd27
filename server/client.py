"""What the CLI talks to: a running mlxd over HTTP (RemoteClient), or the engine in this process
(LocalClient) when no server answers. Both speak in Ollama-shaped dicts, so the CLI has one path.

Every user-facing failure is a ClientError with one line of text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from engine.api import EngineAPI
from server.errors import from_exception
from server.jobs import job_events
from server.ollama import management as mgmt
from server.ollama.generation import prepare_chat, prepare_generate
from server.ollama.schemas import ChatBody, CreateBody, GenerateBody
from server.settings import Settings

Event = dict[str, Any]
log = logging.getLogger("mlxd.cli")


class ClientError(Exception):
    """A failure to show the user as one line."""


def server_url() -> str:
    """MLXD_HOST (a host, host:port or URL) and MLXD_PORT; default http://127.0.0.1:11434."""
    host = os.environ.get("MLXD_HOST", "127.0.0.1").strip() or "127.0.0.1"
    port = os.environ.get("MLXD_PORT", "11434").strip() or "11434"
    if "://" in host:
        return host.rstrip("/")
    if host in ("0.0.0.0", "::"):  # a bind-all address: reach it through loopback
        host = "127.0.0.1"
    if host.count(":") > 1 and not host.startswith("["):
        host = f"[{host}]"
    if ":" in host.rsplit("]", 1)[-1]:
        return f"http://{host}"
    return f"http://{host}:{port}"


def _api_key() -> str | None:
    key = os.environ.get("MLXD_API_KEY", "").split(",")[0].strip()
    return key or None


async def server_running(url: str, timeout: float = 0.5) -> bool:
    """Whether an mlxd answers /health at url (quickly: the CLI falls back to in-process)."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as c:
            return (await c.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


class RemoteClient:
    """Our own API over HTTP."""

    def __init__(self, url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self._http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(None, connect=5.0)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def prepare(self) -> None:
        """Nothing to do: the server is up."""

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = await self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise ClientError(
                f"cannot reach the server at {self.url}: {type(e).__name__}"
            ) from None
        if r.status_code >= 400:
            raise ClientError(_error_text(r.text, r.status_code))
        return r.json() if r.content else None

    async def _stream(self, path: str, body: Event) -> AsyncIterator[Event]:
        try:
            async with self._http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    raise ClientError(_error_text((await r.aread()).decode(), r.status_code))
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if "error" in item:
                        raise ClientError(str(item["error"]))
                    yield item
        except httpx.HTTPError as e:
            raise ClientError(f"lost the connection to the server: {type(e).__name__}") from None

    def chat(self, body: Event) -> AsyncIterator[Event]:
        return self._stream("/api/chat", {**body, "stream": True})

    def generate(self, body: Event) -> AsyncIterator[Event]:
        return self._stream("/api/generate", {**body, "stream": True})

    def pull(self, name: str) -> AsyncIterator[Event]:
        return self._stream("/api/pull", {"model": name, "stream": True})

    async def create(self, name: str, source: str) -> AsyncIterator[Event]:
        """A file or folder here is uploaded as blobs (the server never opens our paths, as
        Ollama's CLI does it); anything else is a model name for the server."""
        path = os.path.expanduser(source)
        if not (os.path.isfile(path) or os.path.isdir(path)):
            async for item in self._stream("/api/create", {"model": name, "from": source}):
                yield item
            return
        files: dict[str, str] = {}
        for upload_name, local in _model_files(path):
            digest = await asyncio.to_thread(_sha256, local)
            files[upload_name] = digest
            if (await self._http.head(f"/api/blobs/{digest}")).status_code == 200:
                continue
            size = local.stat().st_size
            yield {"status": f"uploading {upload_name}", "total": size, "completed": 0}
            async for done in self._upload(local, digest):
                yield {"status": f"uploading {upload_name}", "total": size, "completed": done}
        async for item in self._stream("/api/create", {"model": name, "files": files}):
            yield item

    async def _upload(self, local: Path, digest: str) -> AsyncIterator[int]:
        sent = [0]

        async def chunks() -> AsyncIterator[bytes]:
            with open(local, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    sent[0] += len(chunk)
                    yield chunk

        try:
            r = await self._http.post(f"/api/blobs/{digest}", content=chunks())
        except httpx.HTTPError as e:
            raise ClientError(f"uploading {local.name} failed: {type(e).__name__}") from None
        if r.status_code >= 400:
            raise ClientError(_error_text(r.text, r.status_code))
        yield sent[0]

    async def tags(self) -> Event:
        return await self._json("GET", "/api/tags")

    async def ps(self) -> Event:
        return await self._json("GET", "/api/ps")

    async def show(self, name: str) -> Event:
        return await self._json("POST", "/api/show", {"model": name})

    async def copy(self, src: str, dst: str) -> None:
        await self._json("POST", "/api/copy", {"source": src, "destination": dst})

    async def delete(self, name: str) -> None:
        await self._json("DELETE", "/api/delete", {"model": name})

    async def stop(self, name: str) -> None:
        await self._json("POST", "/api/generate", {"model": name, "keep_alive": 0, "stream": False})


_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _model_files(path: str) -> list[tuple[str, Path]]:
    """(name on the server, local file) to upload: a GGUF file, or a folder's visible files."""
    p = Path(path)
    if p.is_file():
        name = p.name if p.name.lower().endswith(".gguf") else p.name + ".gguf"
        return [(name, p)]
    files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise ClientError(f"{path} holds no files to import")
    return [(f.name, f) for f in files]


def _error_text(text: str, status: int) -> str:
    try:
        err = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        err = None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err) if err else f"the server answered HTTP {status}"


class LocalClient:
    """The engine in this process: the same handlers as the server, without HTTP.

    The engine starts on first need (run, pull, create): listing, copying and removing models
    only touch the registry.
    """

    def __init__(self, engine: EngineAPI, settings: Settings, url: str = ""):
        self.engine = engine
        self.settings = settings
        self.url = url  # where no server answered
        self._started = False

    async def _start(self) -> None:
        if not self._started:
            await self.engine.start()
            self._started = True

    async def prepare(self) -> None:
        """Start the engine now (it imports the default model if absent)."""
        try:
            await self._start()
        except Exception as exc:
            raise ClientError(from_exception(exc).message) from None

    async def aclose(self) -> None:
        if self._started:
            self._started = False
            try:
                await self.engine.shutdown(drain_timeout=1.0)
            except Exception:  # the answer was already given; a failed cleanup is only logged
                log.debug("engine shutdown failed", exc_info=True)

    async def _events(self, make: Any) -> AsyncIterator[Event]:
        try:
            await self._start()
            async for item in make():
                yield item
        except ClientError:
            raise
        except Exception as exc:
            raise ClientError(from_exception(exc).message) from None

    async def _job(self, prepared: tuple[Any, Any] | Event) -> AsyncIterator[Event]:
        if isinstance(prepared, dict):  # an empty prompt loaded or unloaded the model
            yield prepared
            return
        async for event in job_events(self.engine, *prepared):
            yield event

    def chat(self, body: Event) -> AsyncIterator[Event]:
        async def run() -> AsyncIterator[Event]:
            req = ChatBody.model_validate(body)
            async for event in self._job(await prepare_chat(self.engine, self.settings, req)):
                yield event

        return self._events(run)

    def generate(self, body: Event) -> AsyncIterator[Event]:
        async def run() -> AsyncIterator[Event]:
            req = GenerateBody.model_validate(body)
            async for event in self._job(await prepare_generate(self.engine, self.settings, req)):
                yield event

        return self._events(run)

    def pull(self, name: str) -> AsyncIterator[Event]:
        return self._events(lambda: mgmt.pull_events(self.engine, name))

    def create(self, name: str, source: str) -> AsyncIterator[Event]:
        body = CreateBody.model_validate({"model": name, "from": source})
        return self._events(lambda: mgmt.create_events(self.engine, body))

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            result = fn(*args)
            return await result if hasattr(result, "__await__") else result
        except Exception as exc:
            raise ClientError(from_exception(exc).message) from None

    async def tags(self) -> Event:
        models = await self._call(self.engine.list_models)
        return {"models": [mgmt.tag_entry(s) for s in models]}

    def _no_server(self, what: str) -> ClientError:
        where = f" at {self.url}" if self.url else ""
        return ClientError(f"no mlxd server is running{where}: {what} (start one: mlxd serve)")

    async def ps(self) -> Event:
        raise self._no_server("no model is loaded")

    async def show(self, name: str) -> Event:
        return await self._call(mgmt.show_model, self.engine, name)

    async def copy(self, src: str, dst: str) -> None:
        await self._call(self.engine.copy_model, src, dst)

    async def delete(self, name: str) -> None:
        await self._call(self.engine.delete_model, name)

    async def stop(self, name: str) -> None:
        await self._call(self.engine.model_status, name)  # an unknown name is still an error
        raise self._no_server(f"{name} is not loaded, there is nothing to stop")


Client = RemoteClient | LocalClient


async def connect(settings: Any = None, prefer_server: bool = True) -> Client:
    """A RemoteClient when a server answers at MLXD_HOST/MLXD_PORT, else an in-process LocalClient."""
    url = server_url()
    if prefer_server and await server_running(url):
        return RemoteClient(url, _api_key())
    from engine.async_engine import AsyncEngine
    from server.settings import engine_config, load_settings

    settings = settings or load_settings()
    return LocalClient(AsyncEngine(engine_config(settings)), settings, url)
