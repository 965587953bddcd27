"""The built-in chat page: `GET /` for browsers, "Ollama is running" for API clients.

The page is three static files shipped in the package (server/static: no build step, no CDN), read
once at import. It talks to /v1/models and /v1/chat/completions like any other client.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from server.errors import APIError

router = APIRouter(include_in_schema=False)

_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
_FILES = {
    name: (resources.files("server") / "static" / name).read_bytes()
    for name in ("index.html", "chat.css", "chat.js", "markdown.js")
}
# The page may load nothing from elsewhere: it must work offline and can't be turned into a probe.
_CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
ASSET_PATHS = frozenset(f"/ui/{name}" for name in _FILES if name != "index.html")


def wants_html(request: Request) -> bool:
    """Browsers navigating to the page send Accept: text/html; curl and SDKs don't."""
    return "text/html" in request.headers.get("accept", "")


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> Response:
    if wants_html(request):
        return HTMLResponse(_FILES["index.html"], headers={"Content-Security-Policy": _CSP})
    return PlainTextResponse("Ollama is running")


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    body = _FILES.get(name)
    if body is None or name == "index.html":
        raise APIError(404, f"no route for GET /ui/{name[:64]}", code="not_found")
    media = _TYPES[name[name.rfind(".") :]]
    return Response(body, media_type=f"{media}; charset=utf-8")
