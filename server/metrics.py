"""Prometheus metrics and request logs for the HTTP server; it renders what the engine reports.

`install_metrics(app, engine)` adds `GET /metrics` (Prometheus text format, a private
CollectorRegistry per app) and an ASGI middleware that counts requests by endpoint (the route
template), model and outcome, times them end to end, and writes one log line per request
(server/logging_setup.py) under the id RequestIdMiddleware gave it. Nothing wraps the engine:
- per-request figures come from the engine's own RequestMetrics, which the job runner hands to
  `Metrics.job_ended` when a job ends (server/jobs.py), and from ModelHandle.load_time;
- rejections (queue full, memory, context, shutting down) are the errors that answered a request
  (server/errors.py notes them on the request's state);
- engine-wide gauges are `engine.stats()` at scrape time (a custom collector).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from engine.types import RequestMetrics
from server.errors import ERROR_STATE, from_exception
from server.jobs import JobResult
from server.logging_setup import RequestLogEntry, log_request
from server.middleware import assign_request_id

log = logging.getLogger("mlxd.metrics")

# Latency buckets in seconds: CPU decode steps are ~10-500 ms; GPU ones a few ms.
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
# Error codes (server/errors.py) of refusals before a request runs -> the `reason` label.
_REJECTIONS = {
    "queue_full": "queue_full",
    "insufficient_memory": "memory",
    "context_length_exceeded": "context",
    "shutting_down": "shutting_down",
    "invalid_request": "invalid",  # the engine refused it: a token id past the vocabulary, a bad grammar
}
_QUIET_PATHS = ("/metrics", "/health")  # scraped often: logged at DEBUG only


def rejection_reason(exc: BaseException) -> str | None:
    """The `reason` label of an error that rejects a request before it runs, else None."""
    return _REJECTIONS.get(from_exception(exc).code or "")


@dataclass
class RequestRecord:
    """What the middleware and the job runner learn about one HTTP request."""

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


def _status_outcome(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "ok"


class Metrics:
    """The metric families of one app, and what the server reports into them."""

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

    def observe_engine_request(self, model: str, m: RequestMetrics) -> None:
        """One engine request's own measurements: tokens, queue time, TTFT, token gaps."""
        self.observe_tokens(model, m)
        self.queue.labels(model).observe(m.queue_time)
        if m.completion_tokens:
            self.observe_ttft(model, m.ttft)
        gaps = m.completion_tokens - 1
        if gaps > 0:  # the decode time spread evenly over the gaps between its tokens
            child = self.itl.labels(model)
            for _ in range(gaps):
                child.observe(m.decode_time / gaps)

    def job_ended(self, request: Any, result: JobResult, outcome: str) -> None:
        """The job runner's report of one job (server/jobs.py): all of its engine requests."""
        model = result.job.model
        if result.job.load_time > 0:
            self.observe_model_load(model, result.job.load_time)
        rec = record_of(request)
        for m in result.metrics:
            if m is not None:
                self.observe_engine_request(model, m)
                if rec is not None:
                    rec.add(m)
        if rec is None:
            return
        rec.model = rec.model or model
        if not rec.ttft:
            rec.ttft = min((m.ttft for m in result.metrics if m and m.ttft), default=0.0)
        if rec.outcome in ("", "stop", "length"):  # an abort or error of any job wins
            rec.outcome = outcome

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
            "mlxd_kv_reserved_bytes": (
                "KV bytes admission reserved (each sequence's tokens plus a chunk; the batch "
                "arrays, mlxd_kv_cache_bytes, also hold rows' padding and room to grow)",
                s.kv_reserved_bytes,
            ),
            "mlxd_prefix_cache_bytes": ("Bytes held by the prefix cache", s.prefix_cache_bytes),
            "mlxd_process_resident_bytes": ("Resident memory of the server process", s.rss_bytes),
            "mlxd_mlx_active_bytes": ("MLX active memory", s.mlx_active_bytes),
            "mlxd_mlx_peak_bytes": ("MLX peak memory", s.mlx_peak_bytes),
            "mlxd_mlx_cache_bytes": ("MLX buffer cache memory", s.mlx_cache_bytes),
            "mlxd_mlx_cache_limit_bytes": ("MLX buffer cache limit", s.mlx_cache_limit_bytes),
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
            ("mlxd_engine_failed_requests", "Requests ended by an engine error", s.failed_requests),
            ("mlxd_engine_preemptions", "Sequences preempted to free KV", s.preemptions),
            (
                "mlxd_spec_drafted_tokens",
                "Draft tokens verified (speculative decoding)",
                s.drafted_tokens,
            ),
            ("mlxd_spec_accepted_tokens", "Draft tokens accepted", s.accepted_tokens),
            (
                "mlxd_memory_releases",
                "Times the idle engine gave MLX's buffer cache and free heap pages back",
                s.memory_releases,
            ),
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
        if s.group is not None:
            yield from _group_metrics(s.group)


def _group_metrics(g: Any) -> Iterable[Metric]:
    """A distributed group's ranks and per-rank memory (engine.types.GroupStatus)."""
    up = GaugeMetricFamily("mlxd_group_up", "1 while the distributed group serves", labels=["mode"])
    up.add_metric([g.mode], 0.0 if g.failed else 1.0)
    yield up
    ranks = GaugeMetricFamily("mlxd_group_ranks", "Ranks the model is split across")
    ranks.add_metric([], float(len(g.ranks)))
    yield ranks
    for name, doc, attr in (
        ("mlxd_group_rank_weight_bytes", "Weight bytes each rank holds", "weight_bytes"),
        ("mlxd_group_rank_active_bytes", "MLX active memory of each rank", "active_bytes"),
        ("mlxd_group_rank_peak_bytes", "MLX peak memory of each rank", "peak_bytes"),
        ("mlxd_group_rank_kv_tokens", "Tokens of KV each rank's own budget holds", "kv_tokens"),
    ):
        fam = GaugeMetricFamily(name, doc, labels=["rank"])
        for r in g.ranks:
            fam.add_metric([str(r.rank)], float(getattr(r, attr)))
        yield fam


class ObservabilityMiddleware:
    """Pure ASGI middleware (streams pass through untouched): counts, timings, one log line.

    Runs inside RequestIdMiddleware and logs under the id it assigned; a job's figures arrive
    through `Metrics.job_ended` while the response is being sent.
    """

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = assign_request_id(scope)
        rec = RequestRecord(request_id=rid, method=scope.get("method", ""), path=scope["path"])
        scope["state"][_RECORD] = rec

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                rec.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            rec.status = rec.status if rec.status >= 500 else 500
            raise
        finally:
            route = scope.get("route")
            rec.endpoint = getattr(route, "path", None) or "other"
            self._note_error(rec, scope["state"].get(ERROR_STATE))
            self.metrics.finish_request(rec)

    def _note_error(self, rec: RequestRecord, exc: BaseException | None) -> None:
        if exc is None:
            return
        rec.error = rec.error or str(exc)[:200]
        reason = rejection_reason(exc)
        if reason:
            self.metrics.observe_rejection(reason)
            rec.outcome = "rejected"


_RECORD = "mlxd_metrics_record"


def record_of(request: Any) -> RequestRecord | None:
    """The record ObservabilityMiddleware keeps for this request (Request or ASGI scope)."""
    scope = getattr(request, "scope", request)
    record = scope.get("state", {}).get(_RECORD)
    return record if isinstance(record, RequestRecord) else None


def install_metrics(
    app: FastAPI, engine: Any, registry: CollectorRegistry | None = None
) -> Metrics:
    """Add GET /metrics and the observability middleware to `app` (add RequestIdMiddleware
    after it, so it runs outside). Returns the Metrics, also `app.state.metrics`, which the job
    runner reports to."""
    metrics = Metrics(engine, registry)
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return metrics
