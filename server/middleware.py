"""Pure-ASGI middleware: request ids, the body size limit and a last-resort error guard.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and client-disconnect detection pass
through untouched.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response
from server.logging_setup import REQUEST_ID

REQUEST_ID_HEADER = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def assign_request_id(scope: Scope) -> str:
    """This request's id: the one already assigned, else the client's when sane, else new."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if not rid:
        given = _header(scope, REQUEST_ID_HEADER.encode())
        rid = given if given and _SAFE_ID.match(given) else f"req-{uuid.uuid4().hex[:24]}"
        state["request_id"] = rid
    return str(rid)


def request_id(scope_or_request: Any) -> str:
    """The id RequestIdMiddleware assigned to this request (Request or ASGI scope)."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return str(scope.get("state", {}).get("request_id", ""))


class RequestIdMiddleware:
    """Adds X-Request-Id to every response: the client's when it is sane, else a fresh one.

    Also the last-resort guard: an exception that escapes the app before the response started
    becomes a JSON 500 (with the id header), never a traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = assign_request_id(scope)
        REQUEST_ID.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:
                raise
            response = error_response(scope.get("path", ""), exc)
            await response(scope, receive, send_with_id)


class _BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body exceeds the limit of {limit} bytes", code="request_too_large"
        )


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once when Content-Length says so, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Blob uploads (model files) stream to disk, hashed as they arrive: no request-size cap.
        blob = scope.get("path", "").startswith("/api/blobs/")
        if scope["type"] != "http" or self.max_bytes <= 0 or blob:
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(scope.get("path", ""), _BodyTooLarge(self.max_bytes))(
                scope, receive, send
            )
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)  # the handler's error mapping answers 413
            return message

        await self.app(scope, limited_receive, send)
