"""The soak's memory samples, its checks and its pass/fail table (no I/O: unit-tested).

A sample is one /metrics scrape. Every sample taken while the streams run, once the model is
loaded, is checked (also those of a long first step, before the running gauge shows its rows):
the process's resident memory must stay within `base + (1 + margin) x (weights + KV in use + prefix cache)`, where `base` is
what the process holds before any model is loaded (interpreter, libraries, HTTP: the soak reads
it right after startup). The plain ratio RSS / (weights + KV + prefix) is shown next to it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

MB = 1e6


@dataclass
class Sample:
    """One scrape of the server's /metrics (bytes), `t` seconds into the soak."""

    t: float = 0.0
    rss: int = 0
    weights: int = 0
    kv: int = 0
    kv_reserved: int = 0  # what admission counts: the sequences' own tokens plus a chunk
    prefix: int = 0
    mlx_cache: int = 0
    mlx_active: int = 0
    running: int = 0
    steps: int = 0  # engine steps so far (the KV and prefix gauges change once a step)
    releases: int = -1  # idle releases so far; -1: the server does not report them

    @property
    def live(self) -> int:
        """What the bound allows for: weights + KV in use + prefix cache."""
        return self.weights + self.kv + self.prefix


def _gauges(text: str) -> dict[str, float]:
    """name -> value of every sample line; values of one name with labels are summed."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})? (\S+)$", text, flags=re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def parse_metrics(text: str, t: float = 0.0, rss: int | None = None) -> Sample:
    """A sample from a /metrics text; `rss` stands in when the server does not export it."""
    g = _gauges(text)
    releases = g.get("mlxd_memory_releases_total", g.get("mlxd_memory_releases"))
    return Sample(
        t=t,
        rss=int(g.get("mlxd_process_resident_bytes", rss or 0)),
        weights=int(g.get("mlxd_model_weight_bytes", 0)),
        kv=int(g.get("mlxd_kv_cache_bytes", 0)),
        kv_reserved=int(g.get("mlxd_kv_reserved_bytes", 0)),
        prefix=int(g.get("mlxd_prefix_cache_bytes", 0)),
        mlx_cache=int(g.get("mlxd_mlx_cache_bytes", 0)),
        mlx_active=int(g.get("mlxd_mlx_active_bytes", 0)),
        running=int(g.get("mlxd_running_sequences", 0)),
        steps=int(g.get("mlxd_engine_steps_total", g.get("mlxd_engine_steps", 0))),
        releases=-1 if releases is None else int(releases),
    )


@dataclass
class Traffic:
    """What the streams did."""

    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    tokens: int = 0
    first_errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # seconds to each stream's first chunk
    itl: list[float] = field(default_factory=list)  # seconds between a stream's chunks

    def latency(self) -> str:
        """TTFT and inter-chunk gaps, median and p95 (what a memory change must not slow)."""

        def q(xs: list[float], scale: float) -> str:
            if not xs:
                return "-"
            xs = sorted(xs)
            return f"{xs[len(xs) // 2] * scale:.0f} / {xs[int(0.95 * (len(xs) - 1))] * scale:.0f}"

        return f"TTFT p50 / p95 {q(self.ttft, 1e3)} ms; ITL p50 / p95 {q(self.itl, 1e3)} ms"

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(message)


@dataclass
class SoakResult:
    label: str
    streams: int
    duration: float
    cancel_fraction: float
    margin: float
    base: Sample  # before any model was loaded
    samples: list[Sample]  # during the soak
    idle: Sample  # after the load, once the server had been idle
    traffic: Traffic
    load_average: str = ""

    def bound(self, s: Sample) -> float:
        return self.base.rss + (1 + self.margin) * s.live

    def ratio(self, s: Sample) -> float:
        return s.rss / self.bound(s)

    @property
    def under_load(self) -> list[Sample]:
        """The samples taken during the load (the soak samples only then) with a model loaded."""
        return [s for s in self.samples if s.weights > 0]

    def quantiles(self) -> tuple[float, float, float]:
        """(median, p95, worst) of RSS / bound over the samples under load (inf: none)."""
        ratios = sorted(self.ratio(s) for s in self.under_load)
        if not ratios:
            return (float("inf"),) * 3  # type: ignore[return-value]
        return ratios[len(ratios) // 2], ratios[int(0.95 * (len(ratios) - 1))], ratios[-1]

    def checks(self) -> list[tuple[str, bool, str]]:
        """(what, passed, detail) of each check."""
        load = self.under_load
        median, p95, worst = self.quantiles()
        over = sum(self.ratio(s) > 1 for s in load)
        idle_cache = self.idle.mlx_cache
        return [
            (
                f"RSS under load <= base + {1 + self.margin:.2f} x (weights + KV + prefix)",
                bool(load) and worst <= 1.0,
                f"worst {worst:.2f}, p95 {p95:.2f}, median {median:.2f} of the bound; "
                f"{over} of {len(load)} samples over",
            ),
            (
                "every stream answered without an error",
                self.traffic.errors == 0 and self.traffic.completed > 0,
                f"{self.traffic.errors} errors",
            ),
            (
                "MLX's buffer cache given back when idle",
                idle_cache <= 0.05 * max(self.idle.live, 1),
                f"{idle_cache / MB:.0f} MB held after the load",
            ),
        ]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks())

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "samples"},
            "samples": [
                {**asdict(s), "bound": round(self.bound(s)), "within": self.ratio(s) <= 1}
                for s in self.samples
            ],
            "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in self.checks()],
        }


def _median_p95_worst(result: SoakResult) -> list[Sample | None]:
    load = sorted(result.under_load, key=result.ratio)
    if not load:
        return [None] * 3
    return [load[len(load) // 2], load[int(0.95 * (len(load) - 1))], load[-1]]


def format_soak(result: SoakResult) -> str:
    """The table: memory at start, at the median, p95 and worst sample under load (by RSS /
    bound), after idle; then each check's verdict."""
    mid, p95, worst = _median_p95_worst(result)
    cols = [("start", result.base), ("load p50", mid), ("load p95", p95), ("load max", worst)]
    cols.append(("idle", result.idle))
    t = result.traffic
    lines = [
        f"soak {result.label}: {result.streams} streams for {result.duration:.0f} s, "
        f"{result.cancel_fraction:.0%} cancelled mid-stream (load average {result.load_average})",
        f"requests: {t.completed} completed, {t.cancelled} cancelled, {t.errors} errors; "
        f"{t.tokens} tokens streamed",
        t.latency(),
        "",
        f"{'MB':<34}" + "".join(f"{name:>11}" for name, _ in cols),
    ]

    def row(name: str, value: Any) -> str:
        cells = [value(s) if s is not None else None for _, s in cols]
        return f"{name:<34}" + "".join(
            f"{'-':>11}" if c is None else f"{c:>11.2f}" if isinstance(c, float) else f"{c:>11}"
            for c in cells
        )

    def mb(attr: str) -> Any:
        return lambda s: round(getattr(s, attr) / MB)

    lines += [
        row("RSS", mb("rss")),
        row("weights", mb("weights")),
        row("KV in use", mb("kv")),
        row("  of it reserved by admission", mb("kv_reserved")),
        row("prefix cache", mb("prefix")),
        row("MLX buffer cache", mb("mlx_cache")),
        row("MLX active", mb("mlx_active")),
        row("  of it beyond w + KV + p (a step's)", lambda s: round((s.mlx_active - s.live) / MB)),
        row("running rows (as of the last step)", lambda s: s.running),
        row(
            f"bound: base + {1 + result.margin:.1f} x (w + KV + p)",
            lambda s: round(result.bound(s) / MB),
        ),  # fmt: skip
        row("RSS / bound", lambda s: result.ratio(s) if s.live else None),
        row("RSS / (weights + KV + prefix)", lambda s: s.rss / s.live if s.live else None),
        "",
    ]
    for what, ok, detail in result.checks():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {what}: {detail}")
    return "\n".join(lines)
