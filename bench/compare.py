"""Tables of benchmark results: one run, or two runs side by side with ratios (A / B)."""

from __future__ import annotations

from bench.loadgen import BenchResult, LevelResult

# (column title, LevelResult attribute, scale, format, higher is better)
_METRICS = [
    ("tok/s", "tokens_per_s", 1.0, "{:.1f}", True),
    ("TTFT p50 ms", "ttft_p50", 1e3, "{:.0f}", False),
    ("TTFT p95 ms", "ttft_p95", 1e3, "{:.0f}", False),
    ("ITL p50 ms", "itl_p50", 1e3, "{:.1f}", False),
    ("ITL p95 ms", "itl_p95", 1e3, "{:.1f}", False),
    ("errors", "errors", 1.0, "{:.0f}", False),
]


def _cell(level: LevelResult | None, attr: str, scale: float, fmt: str) -> str:
    return "-" if level is None else fmt.format(getattr(level, attr) * scale)


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "-" if a == 0 else "inf"
    return f"{a / b:.2f}x"


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_result(result: BenchResult) -> str:
    """One run as a table: a row per concurrency level."""
    rows = [["conc", "reqs", *(m[0] for m in _METRICS)]]
    for lv in result.levels:
        rows.append(
            [str(lv.concurrency), str(lv.requests)]
            + [_cell(lv, attr, scale, fmt) for _, attr, scale, fmt, _ in _METRICS]
        )
    head = f"{result.label}  ({result.base_url}, model {result.model})"
    return "\n".join([head, _render(rows), *_prefix_lines([result])])


def format_comparison(a: BenchResult, b: BenchResult) -> str:
    """A and B side by side; ratio columns are A / B (tok/s: higher is better for A; latencies:
    lower is better for A)."""
    rows = [["conc"]]
    for title, *_ in _METRICS:
        rows[0] += [f"{title} {a.label}", f"{title} {b.label}", "ratio"]
    by_b = {lv.concurrency: lv for lv in b.levels}
    for lv in a.levels:
        other = by_b.get(lv.concurrency)
        row = [str(lv.concurrency)]
        for _, attr, scale, fmt, _better in _METRICS:
            va = getattr(lv, attr)
            vb = getattr(other, attr) if other else 0.0
            ratio = _ratio(va, vb) if other and attr != "errors" else "-"
            row += [_cell(lv, attr, scale, fmt), _cell(other, attr, scale, fmt), ratio]
        rows.append(row)
    head = f"A = {a.label} ({a.base_url})   B = {b.label} ({b.base_url})   ratio = A / B"
    return "\n".join([head, _render(rows), *_prefix_lines([a, b])])


def _prefix_lines(results: list[BenchResult]) -> list[str]:
    out = []
    for r in results:
        if r.prefix_cold_ttft is None and r.prefix_warm_ttft is None:
            continue
        cold = f"{r.prefix_cold_ttft * 1e3:.0f} ms" if r.prefix_cold_ttft is not None else "failed"
        warm = f"{r.prefix_warm_ttft * 1e3:.0f} ms" if r.prefix_warm_ttft is not None else "failed"
        prefix = r.config.get("prefix_tokens", "?")
        out.append(
            f"shared prefix (~{prefix} tokens) {r.label}: first TTFT {cold}, repeated {warm}"
        )
    return out
