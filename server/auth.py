"""Optional API keys: `Authorization: Bearer <key>` or `x-api-key: <key>` (Anthropic's header),
checked in constant time. /health and the chat page's static files stay open (the page asks for
the key and sends it with its API calls)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, error_response
from server.webui import ASSET_PATHS

OPEN_PATHS = frozenset({"/health", "/"}) | ASSET_PATHS


def key_matches(given: str, keys: list[str]) -> bool:
    """True when `given` equals one of `keys`; every key is compared, so timing reveals nothing."""
    given_b = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key.encode())
    return ok


def bearer_token(scope: Scope) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `x-api-key: <key>`."""
    token = None
    for name, value in scope.get("headers", []):
        name = name.lower()
        if name == b"authorization":
            scheme, _, bearer = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and bearer.strip():
                return bearer.strip()
        elif name == b"x-api-key" and value.strip():
            token = value.decode("latin-1").strip()
    return token


class APIKeyMiddleware:
    """Rejects requests without a valid key with 401 in the API's error shape (OpenAI or Ollama)."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        msg = "missing API key" if token is None else "invalid API key"
        err = APIError(401, f"{msg}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        response = error_response(scope.get("path", ""), err)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
