"""`mlxd bench --profile --prefill 512,1024,2048`: where one prompt's prefill goes, by op class.

The prompt is prefilled into fresh caches (KV only, no lm_head, as the server prefills) once as
the server runs it and once with every submodule between barriers (bench/profile.py's wrappers,
the parts of fused layers included: a prefill runs them as separate ops). The time spent
dequantizing weights for the BLAS (part of the matmuls' time from qkernels.BLAS_ROWS rows on)
is measured on its own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from bench.profile import CLASSES, Clock, instrument, timed_step


def _prompt(lm: Any, n: int, seed: int) -> mx.array:
    vocab = int(lm.config.get("vocab_size") or 32000)
    return mx.random.randint(3, min(vocab, 30000), (1, n), key=mx.random.key(seed))


def _transformer(model: nn.Module) -> Any:
    """The model without its lm_head (mlx-lm's `model.model`), else the whole model."""
    inner = model.get("model") if isinstance(model, dict) or "model" in model else None
    return inner if inner is not None else model


def real_prefill(lm: Any, n: int, repeats: int) -> float:
    """Median seconds of a prefill of n tokens into fresh caches, as the server runs it."""
    times = []
    for i in range(repeats + 1):
        ids, caches = _prompt(lm, n, i), lm.make_cache()
        mx.eval(ids)
        t0 = time.perf_counter()
        lm.model(ids, cache=caches)  # lazy logits: only the KV is computed
        mx.eval([c.state for c in caches])
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def barriered_prefill(lm: Any, clock: Clock, n: int, repeats: int) -> dict[str, float]:
    """Mean seconds per op class of a prefill of n tokens, every submodule between barriers."""
    totals: dict[str, float] = defaultdict(float)
    body = _transformer(lm.model)
    for i in range(repeats + 1):
        ids, caches = _prompt(lm, n, 100 + i), lm.make_cache()
        mx.eval(ids)
        clock.totals, clock.calls = defaultdict(float), 0
        clock.enabled = True
        mx.eval(body(ids, cache=caches))
        clock.enabled = False
        if i:
            for k, v in clock.totals.items():
                totals[k] += v / repeats
    return dict(totals)


def dequantize_seconds(lm: Any, repeats: int) -> float:
    """What one pass over the model's quantized matmul weights to float32 costs (what a prefill
    of qkernels.BLAS_ROWS rows or more does for each layer it runs through the BLAS)."""
    from models import qkernels
    from models.quant_layers import CpuQuantizedLinear

    layers = [m for _, m in lm.model.named_modules() if isinstance(m, CpuQuantizedLinear)]
    if not layers or not qkernels.available():
        return 0.0
    ext = qkernels._ext
    assert ext is not None
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        for m in layers:
            mx.eval(ext.dequantize(m.weight, m.scales, m.biases, m.bits))
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_prefill(lm: Any, args: argparse.Namespace) -> str:
    """Where a prefill's time goes at each of args.prefill prompt lengths."""
    from models import qkernels

    real = {}
    for n in args.prefill:
        with timed_step(f"{n}-token prefill, real"):
            real[n] = real_prefill(lm, n, args.steps)
    clock = Clock()
    instrument(lm.model, clock, decode=False)
    split = {}
    for n in args.prefill:
        with timed_step(f"{n}-token prefill with barriers"):
            split[n] = barriered_prefill(lm, clock, n, args.steps)
    with timed_step("dequantizing the weights alone"):
        deq = dequantize_seconds(lm, args.steps)
    cols = list(real)
    width = max(len(c) for c in CLASSES)
    head = f"{'ms per prefill':<{width}}" + "".join(f"{f'{n} tokens':>18}" for n in cols)
    lines = [
        f"model {lm.name}: {lm.weight_format}, {mx.default_device()}, one prompt prefilled"
        f" into fresh caches (KV only), median of {args.steps} (1 warm-up); BLAS from"
        f" {qkernels.BLAS_ROWS} rows",
        "",
        head,
        "-" * len(head),
    ]
    for cls in CLASSES:
        if not any(split[n].get(cls) for n in cols):
            continue
        cells = []
        for n in cols:
            ms, total = split[n].get(cls, 0.0) * 1e3, sum(split[n].values()) * 1e3
            cells.append(f"{ms:9.1f} ({100 * ms / total:3.0f}%)" if total else "-")
        lines.append(f"{cls:<{width}}" + "".join(f"{c:>18}" for c in cells))
    lines.append("-" * len(head))
    rows = [
        ("sum, with barriers", [sum(split[n].values()) * 1e3 for n in cols]),
        ("real prefill, no barriers", [real[n] * 1e3 for n in cols]),
        ("prefill tokens/s (real)", [n / real[n] for n in cols]),
    ]
    for title, values in rows:
        lines.append(f"{title:<{width}}" + "".join(f"{v:>18.1f}" for v in values))
    blas = [n for n in cols if n >= qkernels.BLAS_ROWS]
    lines += [
        "",
        f"dequantizing every matmul weight to float32 alone: {deq * 1e3:.1f} ms"
        + (f" (in the matmul time above at {', '.join(map(str, blas))} tokens)" if blas else ""),
        "Barriers (an mx.eval around every submodule) stop MLX from overlapping ops across",
        "modules: read the split, not the sum.",
    ]
    return "\n".join(lines)
