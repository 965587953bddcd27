"""The FastAPI application: middleware, routers, /health, and `serve()` for the CLI."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from engine.api import EngineAPI
from server.anthropic.router import router as anthropic_router
from server.auth import APIKeyMiddleware
from server.errors import install_error_handlers
from server.hostcheck import HostCheckMiddleware
from server.metrics import install_metrics
from server.middleware import BodyLimitMiddleware, RequestIdMiddleware
from server.ollama.blobs import router as blobs_router
from server.ollama.router import router as ollama_router
from server.openai.router import router as openai_router
from server.openapi_doc import install_openapi
from server.responses.router import router as responses_router
from server.settings import Settings
from server.sse import KEEPALIVE_SECONDS
from server.webui import router as webui_router

log = logging.getLogger("mlxd.server")

# CPython's GIL switch interval in the server: the engine thread, the event loop and a model
# load share the GIL, and after each ~8 ms step the engine thread waits up to this long for it
# while another thread runs Python (CPython's default: 5 ms). In-process, SmolLM2 decoding one
# row beside a thread running pure Python (2 cores): steps of 17.8 ms (median) at 5 ms, 13.1 ms
# at 1 ms, 14.0 ms at 0.2 ms (8.1-8.6 alone). `mlxd bench` side by side at 1/4/16 streams,
# greedy and T=0.7, both orders: within each order's noise of 5 ms.
GIL_SWITCH_SECONDS = 0.001

# What browser clients of the APIs send: the key (Bearer, or Anthropic's x-api-key), Anthropic's
# version and beta headers, and the OpenAI and Anthropic SDKs' x-stainless-* telemetry (Ollama
# allows those too). A preflight naming any other header is refused.
CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "X-Request-Id",
    "X-Api-Key",
    "Anthropic-Version",
    "Anthropic-Beta",
    "Anthropic-Dangerous-Direct-Browser-Access",
    "OpenAI-Beta",
    "OpenAI-Organization",
    "OpenAI-Project",
    *(
        f"X-Stainless-{h}"
        for h in (
            "Arch",
            "Async",
            "Custom-Poll-Interval",
            "Helper-Method",
            "Lang",
            "OS",
            "Package-Version",
            "Poll-Helper",
            "Retry-Count",
            "Runtime",
            "Runtime-Version",
            "Timeout",
        )
    ),
]


def create_app(settings: Settings, engine: EngineAPI) -> FastAPI:
    """Build the app around `engine`; the lifespan starts it and shuts it down.

    Handlers reach their dependencies through `request.app.state`: `engine`, `settings` and
    `keepalive_seconds` (SSE keep-alive interval; tests shorten it).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="mlxd", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.state.keepalive_seconds = KEEPALIVE_SECONDS
    install_error_handlers(app)

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        # Reads one attribute: never waits on a load or on the engine thread.
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    app.include_router(webui_router)
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    app.include_router(responses_router)
    app.include_router(ollama_router)
    app.include_router(blobs_router)
    install_openapi(app)

    # Added innermost first: requests pass CORS -> request id -> body limit -> auth -> routes.
    if settings.api_keys:
        app.add_middleware(APIKeyMiddleware, keys=list(settings.api_keys))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Like Ollama: bound to loopback, refuse other Host headers (DNS-rebinding from web pages).
    app.add_middleware(HostCheckMiddleware, bind_host=settings.host)
    install_metrics(app, engine)  # GET /metrics + counts/logs; inside RequestId, reusing its id
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=CORS_HEADERS,
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a busy port is reported before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, engine: EngineAPI) -> int:
    """Run the real server around `engine` until interrupted; returns the process exit code."""
    import uvicorn

    from server.logging_setup import configure_logging
    from server.shutdown import GracefulServer

    configure_logging(settings.log_level)  # the level of mlxd's own loggers, request lines included

    try:
        sock = _bind(settings.host, settings.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(
                f"mlxd: port {settings.port} on {settings.host} is already in use", file=sys.stderr
            )
        else:
            print(
                f"mlxd: cannot listen on {settings.host}:{settings.port}: {e.strerror}",
                file=sys.stderr,
            )
        return 1
    sys.setswitchinterval(GIL_SWITCH_SECONDS)  # the engine thread's wait for the GIL per step
    app = create_app(settings, engine)
    config = uvicorn.Config(
        app, log_level=settings.log_level.lower(), lifespan="on", timeout_graceful_shutdown=15
    )
    # SIGTERM/SIGINT drain the engine at once and exit 0 (see server/shutdown.py).
    server = GracefulServer(config, app.state.engine, settings.drain_timeout)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0 if server.started else 1
