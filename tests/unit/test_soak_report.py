"""The soak's verdicts from its samples (bench/soak_report.py), and its reading of /metrics."""

from __future__ import annotations

import httpx

from bench.soak_report import Sample, SoakResult, Traffic, format_soak, parse_metrics
from tests.server.fake_engine import FakeEngine, make_app

MB = 1_000_000


def result(samples: list[Sample], idle_cache: int = 0, errors: int = 0) -> SoakResult:
    base = Sample(rss=150 * MB)
    idle = Sample(rss=400 * MB, weights=100 * MB, prefix=50 * MB, mlx_cache=idle_cache)
    traffic = Traffic(completed=10, cancelled=3, errors=errors, tokens=900)
    return SoakResult("t", 32, 60.0, 0.25, 0.2, base, samples, idle, traffic, "1.0")


def loaded(rss_mb: int, running: int = 8) -> Sample:
    return Sample(rss=rss_mb * MB, weights=100 * MB, kv=200 * MB, prefix=100 * MB, running=running)


def test_rss_within_base_plus_margin_passes_and_one_sample_over_fails() -> None:
    # bound: 150 + 1.2 x 400 = 630 MB
    loading = Sample(rss=900 * MB)  # the model not loaded yet: no bound to check against
    ok = result([loading, loaded(500), loaded(630)])
    assert ok.passed, ok.checks()
    bad = result([loaded(500), loaded(640)])
    assert not bad.passed
    assert "1 of 2 samples over" in bad.checks()[0][2]
    assert "FAIL" in format_soak(bad) and "PASS" in format_soak(ok)
    # A long first step: /metrics shows no running rows until it ends, and it is checked too.
    first_step = result([loaded(500), loaded(900, running=0)])
    assert not first_step.passed and "1 of 2 samples over" in first_step.checks()[0][2]
    within = [s["within"] for s in first_step.to_json()["samples"]]
    assert within == [True, False]


def test_median_p95_and_worst_of_the_ratios() -> None:
    samples = [loaded(rss) for rss in range(300, 700, 4)]  # 100 samples, ratios up to 1.1
    median, p95, worst = result(samples).quantiles()
    bound = 630
    assert (median, p95, worst) == (500 / bound, 676 / bound, 696 / bound)
    assert f"worst {696 / bound:.2f}, p95 {676 / bound:.2f}" in result(samples).checks()[0][2]


def test_errors_no_load_and_a_kept_cache_fail() -> None:
    assert not result([loaded(500)], errors=1).passed
    assert not result([]).passed  # nothing ran under load: no verdict to give
    assert not result([loaded(500)], idle_cache=100 * MB).passed


async def test_reads_the_servers_metrics() -> None:
    app = make_app(FakeEngine())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        text = (await client.get("/metrics")).text
    s = parse_metrics(text, t=1.5, rss=7)
    assert s.t == 1.5 and s.releases == 0  # the fake engine reports zeros: all fields found
    assert s.rss == 0  # the exported RSS wins over the stand-in
    older = parse_metrics("mlxd_kv_cache_bytes 5.0\nmlxd_running_sequences 2.0\n", rss=7)
    assert (older.rss, older.kv, older.running, older.releases) == (7, 5, 2, -1)
    weights = 'mlxd_model_weight_bytes{model="a"} 3.0\nmlxd_model_weight_bytes{model="b"} 4.0\n'
    assert parse_metrics(weights).weights == 7
    assert parse_metrics("mlxd_engine_steps_total 12.0\n").steps == 12
