"""Drive an ASGI app by hand: a POST scope and a receive() that can simulate a disconnect."""

from __future__ import annotations

import asyncio


def asgi_scope(path: str) -> dict:
    """A POST's ASGI scope (JSON body), for driving an app without a client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


def asgi_receiver(body: bytes, gone: asyncio.Event | None = None):
    """An ASGI receive: the body, then http.disconnect once `gone` is set (never, if None)."""
    state = {"sent": False}

    async def receive() -> dict:
        if not state["sent"]:
            state["sent"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await (gone.wait() if gone else asyncio.Event().wait())
        return {"type": "http.disconnect"}

    return receive
