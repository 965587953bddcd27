"""Optional API keys: `Authorization: Bearer <key>` checked in constant time; /health stays open."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, error_response

OPEN_PATHS = frozenset({"/health"})


def key_matches(given: str, keys: list[str]) -> bool:
    """True when `given` equals one of `keys`; every key is compared, so timing reveals nothing."""
    given_b = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key.encode())
    return ok


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


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
