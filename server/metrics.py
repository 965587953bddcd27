"""Prometheus metrics, request ids and request logs for the HTTP server.

One hook for the app: `install_metrics(app, engine)` adds `GET /metrics` (Prometheus text format,
a private CollectorRegistry per app) and an ASGI middleware that
- gives every request an id (the client's `X-Request-Id` if sane, else a new one), exposed to
  handlers as `request.state.request_id` and returned in the `X-Request-Id` response header
  (unless a handler already set that header);
- counts requests by endpoint (the route template), model and outcome, times them end to end, and
  writes one structured log line per request (server/logging_setup.py).
It also wraps the engine's `generate` and `get_model` so per-request figures (TTFT, inter-token
latency, token counts, rejections, model load time) are recorded without the route handlers doing
anything. Engine-wide gauges come from `engine.stats()` at scrape time (a custom collector).
Handlers that produce work outside `engine.generate` may call the `Metrics.observe_*` methods.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.datastructures import MutableHeaders

from engine.errors import (
    ContextLengthError,
    EngineShuttingDownError,
    InsufficientMemoryError,
    QueueFullError,
)
from engine.types import GenerateRequest, RequestMetrics, RequestOutput
from server.logging_setup import RequestLogEntry, log_request

log = logging.getLogger("mlxd.metrics")

# Latency buckets in seconds: CPU decode steps are ~10-500 ms; GPU ones a few ms.
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_REJECTIONS = (
    (QueueFullError, "queue_full"),
    (InsufficientMemoryError, "memory"),
    (ContextLengthError, "context"),
    (EngineShuttingDownError, "shutting_down"),
)
_QUIET_PATHS = ("/metrics", "/health")  # scraped often: logged at DEBUG only
_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def rejection_reason(exc: BaseException) -> str | None:
    """The `reason` label of an error that rejects a request before it runs, else None."""
    for cls, reason in _REJECTIONS:
        if isinstance(exc, cls):
            return reason
    return None


@dataclass
class RequestRecord:
    """What the middleware and the engine wrapper learn about one HTTP request."""

    request_id: str
    method: str = "GET"
    path: str = ""
    endpoint: str = "other"
    model: str = ""
    status: int = 0
    outcome: str = ""  # stop / length / abort / error / rejected; empty: from the status
    error: str = ""
    start: float = field(default_factory=time.monotonic)
    ttft: float = 0.0
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    def add(self, m: RequestMetrics) -> None:
        """Sum the figures of one engine request (an HTTP request may run several, e.g. n > 1)."""
        t = self.metrics
        t.prompt_tokens += m.prompt_tokens
        t.cached_tokens += m.cached_tokens
        t.completion_tokens += m.completion_tokens
        t.queue_time = max(t.queue_time, m.queue_time)
        t.prefill_time = max(t.prefill_time, m.prefill_time)
        t.decode_time = max(t.decode_time, m.decode_time)


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "mlxd_request", default=None
)


def _status_outcome(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "ok"


class Metrics:
    """The metric families of one app, and the recorder API the server (and its wrappers) call."""

    def __init__(self, engine: Any, registry: CollectorRegistry | None = None):
        self.engine = engine
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlxd_requests", "HTTP requests by endpoint, model and outcome",
            ["endpoint", "model", "outcome"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "mlxd_request_duration_seconds", "End-to-end request latency",
            ["endpoint", "model"], buckets=_REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "mlxd_time_to_first_token_seconds", "Time from the engine call to the first token",
            ["model"], buckets=_TOKEN_BUCKETS + (20.0, 40.0), registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "mlxd_inter_token_latency_seconds", "Time between consecutive generated tokens",
            ["model"], buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "mlxd_queue_time_seconds", "Time requests waited before their first step",
            ["model"], buckets=_TOKEN_BUCKETS + (20.0, 40.0), registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "mlxd_prompt_tokens", "Prompt tokens received", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "mlxd_cached_prompt_tokens", "Prompt tokens served from the prefix cache", ["model"],
            registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "mlxd_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.rejections = Counter(
            "mlxd_rejections", "Requests refused before running, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.model_load = Histogram(
            "mlxd_model_load_seconds", "Time to load a model into memory", ["model"],
            buckets=_LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(EngineCollector(engine))

    # --- the recorder API ----------------------------------------------------------------------
    def observe_tokens(self, model: str, m: RequestMetrics) -> None:
        """Add one request's prompt, cached and generated token counts."""
        self.prompt_tokens.labels(model).inc(m.prompt_tokens)
        self.cached_tokens.labels(model).inc(m.cached_tokens)
        self.generated_tokens.labels(model).inc(m.completion_tokens)

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def observe_token_gap(self, model: str, seconds: float, tokens: int = 1) -> None:
        """`tokens` tokens arrived `seconds` after the previous ones: each counts seconds/tokens."""
        child = self.itl.labels(model)
        for _ in range(max(tokens, 1)):
            child.observe(seconds / max(tokens, 1))

    def observe_rejection(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def observe_model_load(self, model: str, seconds: float) -> None:
        self.model_load.labels(model).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every family, engine gauges included."""
        return generate_latest(self.registry)

    # --- per HTTP request ----------------------------------------------------------------------
    def finish_request(self, rec: RequestRecord) -> None:
        """Count, time and log one HTTP request when its response has ended (or failed)."""
        duration = time.monotonic() - rec.start
        outcome = rec.outcome or _status_outcome(rec.status)
        self.requests.labels(rec.endpoint, rec.model, outcome).inc()
        self.latency.labels(rec.endpoint, rec.model).observe(duration)
        m = rec.metrics
        entry = RequestLogEntry(
            request_id=rec.request_id, method=rec.method, path=rec.path, status=rec.status,
            outcome=outcome, model=rec.model, prompt_tokens=m.prompt_tokens,
            cached_tokens=m.cached_tokens, completion_tokens=m.completion_tokens,
            queue_ms=m.queue_time * 1e3, ttft_ms=rec.ttft * 1e3, prefill_tps=m.prefill_tps,
            decode_tps=m.decode_tps, total_ms=duration * 1e3, error=rec.error,
        )  # fmt: skip
        if rec.path in _QUIET_PATHS:
            if logging.getLogger("mlxd.access").isEnabledFor(logging.DEBUG):
                logging.getLogger("mlxd.access").debug("%s %s %s", rec.method, rec.path, rec.status)
            return
        log_request(entry)


class EngineCollector(Collector):
    """Engine-wide gauges read from `engine.stats()` at scrape time."""

    def __init__(self, engine: Any):
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the snapshot; describing none keeps registration cheap

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("mlxd_engine_up", "1 while the engine thread runs")
        up.add_metric([], 1.0 if getattr(self.engine, "alive", False) else 0.0)
        yield up
        try:
            s = self.engine.stats()
        except Exception as e:  # a scrape must never fail because the engine is stopped
            log.debug("engine.stats() failed: %s", type(e).__name__)
            return
        gauges = {
            "mlxd_running_sequences": ("Sequences decoding or prefilling", s.running),
            "mlxd_waiting_sequences": ("Sequences queued for admission", s.waiting),
            "mlxd_kv_cache_bytes": ("KV cache bytes in use by running sequences", s.kv_bytes),
            "mlxd_kv_cache_budget_bytes": ("KV cache byte budget", s.kv_budget_bytes),
            "mlxd_prefix_cache_bytes": ("Bytes held by the prefix cache", s.prefix_cache_bytes),
            "mlxd_mlx_active_bytes": ("MLX active memory", s.mlx_active_bytes),
            "mlxd_mlx_peak_bytes": ("MLX peak memory", s.mlx_peak_bytes),
            "mlxd_mlx_cache_bytes": ("MLX buffer cache memory", s.mlx_cache_bytes),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        g = GaugeMetricFamily("mlxd_prefix_cache_hit_rate", "Prefix-cache hits / lookups")
        g.add_metric([], rate)
        yield g
        for name, doc, value in (
            ("mlxd_prefix_cache_hits", "Prefix-cache lookups that hit", s.prefix_cache_hits),
            ("mlxd_prefix_cache_queries", "Prefix-cache lookups", s.prefix_cache_queries),
            ("mlxd_engine_steps", "Engine steps executed", s.steps),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
        rej = CounterMetricFamily(
            "mlxd_engine_rejections", "Rejections counted by the engine itself", labels=["reason"]
        )
        for reason, count in sorted(s.rejections.items()):
            rej.add_metric([reason], float(count))
        yield rej
        loaded = GaugeMetricFamily(
            "mlxd_model_weight_bytes",
            "Weight bytes of each loaded model",
            labels=["model", "format"],
        )
        for m in s.loaded:
            loaded.add_metric([m.name, m.weight_format], float(m.weight_bytes))
        yield loaded
        count = GaugeMetricFamily("mlxd_loaded_models", "Models loaded in memory")
        count.add_metric([], float(len(s.loaded)))
        yield count


def _instrument_generate(engine: Any, metrics: Metrics) -> None:
    original = engine.generate

    async def generate(request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        rec = _current.get()
        if rec is not None:
            rec.model = request.model
        start = last = time.monotonic()
        got_token = False
        final: RequestOutput | None = None
        outcome = "abort"  # the consumer left early unless we see a finish or an error
        iterator = original(request).__aiter__()
        try:
            while True:
                try:
                    out = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                now = time.monotonic()
                n = len(out.token_ids) or (1 if out.text else 0)
                if n and not got_token:
                    got_token = True
                    metrics.observe_ttft(request.model, now - start)
                    if rec is not None and not rec.ttft:
                        rec.ttft = now - start
                    n -= 1  # the other tokens of a first multi-token output count as gaps
                if n:
                    metrics.observe_token_gap(request.model, now - last, n)
                last = now
                if out.finished:
                    final = out
                    outcome = out.finish_reason.value if out.finish_reason else "stop"
                yield out
        except Exception as e:
            reason = rejection_reason(e)
            outcome = "rejected" if reason else "error"
            if reason:
                metrics.observe_rejection(reason)
            if rec is not None:
                rec.error = str(e)[:200]
            raise
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # leaving early must reach the engine as an abort
            _record_engine_request(metrics, rec, request.model, outcome, final)

    engine.generate = generate


def _record_engine_request(
    metrics: Metrics, rec: RequestRecord | None, model: str, outcome: str,
    final: RequestOutput | None,
) -> None:  # fmt: skip
    m = final.metrics if final is not None else None
    if m is not None:
        metrics.observe_tokens(model, m)
        metrics.queue.labels(model).observe(m.queue_time)
        if m.load_time > 0:
            metrics.observe_model_load(model, m.load_time)
    if final is not None and final.error and rec is not None:
        rec.error = final.error[:200]
    if rec is None:  # called outside an HTTP request: count it here
        metrics.requests.labels("internal", model, outcome).inc()
        return
    if m is not None:
        rec.add(m)
    if rec.outcome in ("", "stop", "length"):  # an abort or error of any choice wins
        rec.outcome = outcome


def _instrument_get_model(engine: Any, metrics: Metrics) -> None:
    original = engine.get_model

    async def get_model(name: str, *args: Any, **kwargs: Any) -> Any:
        rec = _current.get()
        try:
            was_loaded = any(m.name == name for m in engine.running_models())
        except Exception:
            was_loaded = True  # unknown: don't record a load time we can't attribute
        start = time.monotonic()
        try:
            handle = await original(name, *args, **kwargs)
        except Exception as e:
            reason = rejection_reason(e)
            if reason:
                metrics.observe_rejection(reason)
                if rec is not None:
                    rec.outcome = "rejected"
            raise
        model = getattr(handle, "name", name)
        if rec is not None and not rec.model:
            rec.model = model  # only after success: unknown names must not become label values
        if not was_loaded:
            metrics.observe_model_load(model, time.monotonic() - start)
        return handle

    engine.get_model = get_model


class ObservabilityMiddleware:
    """Pure ASGI middleware (streams pass through untouched): request ids, counts, logs."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        # An outer RequestIdMiddleware may have assigned the id already: log under the same one.
        rid = state.get("request_id") or _incoming_id(scope) or f"req-{uuid.uuid4().hex[:24]}"
        state["request_id"] = rid
        rec = RequestRecord(request_id=rid, method=scope.get("method", ""), path=scope["path"])
        token = _current.set(rec)

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                rec.status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-Id", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            rec.status = rec.status if rec.status >= 500 else 500
            raise
        finally:
            _current.reset(token)
            route = scope.get("route")
            rec.endpoint = getattr(route, "path", None) or "other"
            self.metrics.finish_request(rec)


def _incoming_id(scope: dict) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"x-request-id":
            text = value.decode("latin-1")
            return text if _ID_OK.match(text) else None
    return None


def install_metrics(
    app: FastAPI, engine: Any, registry: CollectorRegistry | None = None
) -> Metrics:
    """Add GET /metrics and the observability middleware to `app`; wrap `engine` to record
    per-request figures. Call once per app, after creating the engine. Returns the Metrics
    (also at `app.state.metrics`)."""
    metrics = Metrics(engine, registry)
    _instrument_generate(engine, metrics)
    _instrument_get_model(engine, metrics)
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return metrics
