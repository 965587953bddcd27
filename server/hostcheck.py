"""Refuse requests whose Host header is not this machine when the server listens on loopback only.

Why: a web page in the user's browser can reach 127.0.0.1 through DNS rebinding (a hostile name
that resolves to 127.0.0.1); its requests then carry that name in Host. Ollama refuses them with
403; so do we. When bound to a non-loopback address the operator chose exposure: no check.

Wire it in create_app:  app.add_middleware(HostCheckMiddleware, bind_host=settings.host)
"""

from __future__ import annotations

import ipaddress
from typing import Any

from server.errors import APIError, error_response

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host part of a Host header value: 'a:1' -> 'a', '[::1]:1' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header  # a bare name, or a bare IPv6 address


def host_allowed(header: str | None, bind_host: str) -> bool:
    """Whether a request with this Host header may reach a server bound to bind_host."""
    if not is_loopback(bind_host):
        return True
    if not header:  # HTTP/1.0 clients may send none; Ollama lets them through too
        return True
    host = host_of(header)
    return is_loopback(host) or host == host_of(bind_host)


class HostCheckMiddleware:
    """ASGI middleware: 403 for a foreign Host on a loopback-bound server, in the shape of the
    API the path belongs to (server/errors.py)."""

    def __init__(self, app: Any, bind_host: str = "127.0.0.1"):
        self.app = app
        self.bind_host = bind_host

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"host")
        if host_allowed(raw.decode("latin-1") if raw else None, self.bind_host):
            await self.app(scope, receive, send)
            return
        refused = APIError(
            403, "forbidden: this server only answers local hosts", code="host_not_allowed"
        )
        await error_response(scope.get("path", ""), refused)(scope, receive, send)
