"""`mlxd bench --profile`: where one decode step's time goes, by op class, at 1, 4 and 16 rows.

The model is loaded in-process the way the server loads it (the registry, the configured weight
format), B sequences are prefilled and merged into one batch cache as the runner does, and decode
steps run in two ways:

- as the server runs them (one `mx.eval` per step): the real step time, and the part of it spent
  building the lazy graph in Python;
- with a barrier around every submodule: each layer's projections, attention, RoPE and norms are
  wrapped (public `update_modules`, as models/cpu_layout.py does) in a timer that evaluates the
  inputs, builds the module's graph (Python time), then evaluates its output (that op class's
  time). A wrapper's own time excludes the wrappers nested in it.

Barriers stop MLX from overlapping and fusing ops across modules and add an eval per module, so
the barriered sum differs from the real step; the split is what this is for.

`--prefill 512,1024,2048` profiles one prompt's prefill of each length instead
(bench/profile_prefill.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from engine.sampling import RowState, sample
from engine.speculative import merge
from engine.types import SamplingParams
from models.fused_stack import FusedStack

# Op classes, in print order.
PROJ = "matmul: q/k/v/o, MLP projections"
HEAD = "matmul: lm_head"
ATTN = "attention: SDPA + KV-cache update"
ROPE = "RoPE"
NORM = "norms (RMSNorm)"
ELEM = "other elementwise: SwiGLU, residuals, embedding, mask"
LAYER = "fused decode layers: all of the above, one op a layer or stack"
SAMPLE = "sampling"
PYTHON = "Python: graph building / dispatch"
CLASSES = [PROJ, HEAD, ATTN, ROPE, NORM, ELEM, LAYER, SAMPLE, PYTHON]


@dataclass
class Clock:
    """Exclusive seconds per op class; `stack` holds [children's seconds, class] per open wrapper."""

    enabled: bool = False
    calls: int = 0  # timed module calls (two barriers each)
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stack: list[list[Any]] = field(default_factory=list)


def _arrays(tree: Any) -> list[mx.array]:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, list | tuple | dict):
        flat: list[tuple[str, Any]] = tree_flatten(tree)  # type: ignore[assignment]
        return [v for _, v in flat if isinstance(v, mx.array)]
    return []


class Timed(nn.Module):
    """Calls `inner` and, while the clock is enabled, times it between two barriers."""

    def __init__(self, inner: nn.Module, op_class: str, clock: Clock):
        super().__init__()
        self.inner = inner
        self.op_class = op_class
        self.clock = clock

    def __getattr__(self, key: str) -> Any:
        # Parents may read a child's attributes (head counts, dims): answer for the wrapped one.
        if key in self:
            return self[key]
        if "inner" not in self:
            raise AttributeError(key)
        return getattr(self["inner"], key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        clock = self.clock
        if not clock.enabled:
            return self.inner(*args, **kwargs)
        clock.calls += 1
        t0 = time.perf_counter()
        mx.eval(_arrays(list(args)) + _arrays(kwargs))  # the parent's lazy ops feeding us
        t1 = time.perf_counter()
        clock.stack.append([0.0, self.op_class])
        try:
            out = self.inner(*args, **kwargs)
            t2 = time.perf_counter()
            mx.eval(_arrays(out))
            t3 = time.perf_counter()
        finally:
            children = clock.stack.pop()[0]
        clock.totals[PYTHON] += (t2 - t1) - children
        clock.totals[self.op_class] += t3 - t2
        if clock.stack:
            parent = clock.stack[-1]
            parent[0] += t3 - t0
            clock.totals[parent[1]] += t1 - t0
        return out


def op_class(name: str, module: nn.Module) -> str | None:
    """The class a submodule's own time counts as; None: leave it unwrapped."""
    kind = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if "Embedding" in kind:
        return None  # tied heads call `embed_tokens.as_linear`, which a wrapper would hide
    if leaf == "lm_head":
        return HEAD
    if isinstance(module, nn.Linear | nn.QuantizedLinear) or "Linear" in kind:
        return PROJ
    if kind == "FusedMLP":
        return PROJ  # gate/up/down and SwiGLU in one kernel op: mostly its matmuls
    if kind in ("FusedBlock", "FusedGemmaBlock") or isinstance(module, FusedStack):
        # A decode step's layer in one kernel op (models/fused_block.py), or all of them with
        # the embedding and final norm (models/fused_stack.py).
        return LAYER
    if "Norm" in kind:
        return NORM
    if "RoPE" in kind or leaf == "rope":
        return ROPE
    if leaf in ("self_attn", "attn", "attention"):
        return ATTN
    return ELEM


def instrument(model: nn.Module, clock: Clock, decode: bool = True) -> Timed:
    """Wrap every submodule (deepest first, so the names stay valid); returns the timed root,
    whose own time is the lm_head of tied-embedding models. `decode=False` (a prefill, which
    runs a fused layer's parts as separate ops) times the parts of fused layers too."""
    named = [(n, m) for n, m in model.named_modules() if n]
    # A fused MLP or layer is one kernel op (a few) over its parts: timed whole, parts unwrapped.
    fused = tuple(
        f"{n}."
        for n, m in named
        if decode
        and (
            type(m).__name__ in ("FusedMLP", "FusedBlock", "FusedGemmaBlock")
            or isinstance(m, FusedStack)
        )
    )
    for name, module in sorted(named, key=lambda nm: -nm[0].count(".")):
        if fused and name.startswith(fused):
            continue
        cls = op_class(name, module)
        if cls == LAYER and not decode:
            cls = ELEM  # its own time in a prefill: the residual adds
        if cls is not None:
            model.update_modules(tree_unflatten([(name, Timed(module, cls, clock))]))
    return Timed(model, HEAD, clock)


# --- the batch ------------------------------------------------------------------------------
def make_batch(lm: Any, rows: int, context: int) -> tuple[list, mx.array]:
    """`rows` sequences of about `context` tokens (lengths differ a little, so rows are left
    padded as in the server), each prefilled alone, then merged into one batch cache."""
    vocab = int(lm.config.get("vocab_size") or 32000)
    per_row = []
    for r in range(rows):
        n = max(2, context - (r % 8))
        ids = mx.random.randint(3, min(vocab, 30000), (1, n), key=mx.random.key(r))
        caches = lm.make_cache()
        lm.model(ids, cache=caches)
        mx.eval([c.state for c in caches])
        per_row.append(caches)
    # As the runner merges them (engine/speculative.py): its batch cache is the server's.
    batch: list[Any] = [merge(list(layer)) for layer in zip(*per_row, strict=True)]
    mx.eval([c.state for c in batch])
    return batch, mx.full((rows, 1), 42, dtype=mx.int32)


def _states(rows: int, temperature: float) -> list[RowState]:
    params = SamplingParams(temperature=temperature, seed=0)
    return [RowState.create(params, []) for _ in range(rows)]


def real_steps(lm: Any, rows: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median (step seconds, graph-build seconds) of steps run as the server runs them."""
    batch, inputs = make_batch(lm, rows, args.context)
    states = _states(rows, args.temperature)
    steps, builds = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        res = sample(lm.model(inputs, cache=batch)[:, -1, :], states)
        t1 = time.perf_counter()
        mx.eval(res.arrays())
        t2 = time.perf_counter()
        inputs = res.tokens[:, None]
        if i >= args.warmup:
            steps.append(t2 - t0)
            builds.append(t1 - t0)
    return statistics.median(steps), statistics.median(builds)


def barriered_steps(
    lm: Any, root: Timed, clock: Clock, rows: int, args: argparse.Namespace
) -> dict[str, float]:
    """Mean seconds per step and op class, every submodule between barriers; `clock.calls`
    is left at one step's count of timed module calls."""
    batch, inputs = make_batch(lm, rows, args.context)
    states = _states(rows, args.temperature)
    totals: dict[str, float] = defaultdict(float)
    for i in range(args.warmup + args.steps):
        clock.totals, clock.calls = defaultdict(float), 0
        clock.enabled = True
        logits = root(inputs, cache=batch)[:, -1, :]
        mx.eval(logits)
        clock.enabled = False
        t0 = time.perf_counter()
        res = sample(logits, states)
        mx.eval(res.arrays())
        clock.totals[SAMPLE] += time.perf_counter() - t0
        inputs = res.tokens[:, None]
        if i >= args.warmup:
            for k, v in clock.totals.items():
                totals[k] += v / args.steps
    return dict(totals)


@contextmanager
def timed_step(what: str) -> Iterator[None]:
    print(f"{what} ...", flush=True, end=" ")
    t = time.perf_counter()
    yield
    print(f"{time.perf_counter() - t:.1f} s", flush=True)


def run(args: argparse.Namespace) -> str:
    """Load the model, measure every row count both ways, return the report."""
    from models.default import BUNDLED
    from models.registry import ModelRegistry
    from server.settings import load_settings

    settings = load_settings()
    name = args.model or settings.default_model
    registry = ModelRegistry(settings.models_dir, weights_on_cpu=settings.weights_on_cpu)
    with timed_step(f"loading {name}"):
        if name in BUNDLED:
            registry.ensure_default(name)  # imports the bundled GGUF on first use
        lm = registry.acquire(name)
    if getattr(args, "prefill", None):
        from bench.profile_prefill import run_prefill

        return run_prefill(lm, args)
    real: dict[int, tuple[float, float]] = {}
    for rows in args.rows:
        with timed_step(f"{rows} rows, real steps"):
            real[rows] = real_steps(lm, rows, args)
    clock = Clock()
    root = instrument(lm.model, clock)
    split: dict[int, dict[str, float]] = {}
    for rows in args.rows:
        with timed_step(f"{rows} rows, steps with barriers"):
            split[rows] = barriered_steps(lm, root, clock, rows, args)
    return report(lm, real, split, args, clock.calls)


def report(
    lm: Any,
    real: dict[int, tuple[float, float]],
    split: dict[int, dict[str, float]],
    args: Any,
    calls: int = 0,
) -> str:
    rows = list(real)
    width = max(len(c) for c in CLASSES)
    head = f"{'ms per decode step':<{width}}" + "".join(f"{f'{r} rows':>16}" for r in rows)
    lines = [
        f"model {lm.name}: {lm.weight_format}, {mx.default_device()}, context ~{args.context}"
        f" tokens, temperature {args.temperature:g}, median of {args.steps} steps"
        f" ({args.warmup} warm-up)",
        "",
        head,
        "-" * len(head),
    ]
    for cls in CLASSES:
        if not any(split[r].get(cls) for r in rows):
            continue  # e.g. a fused layer's parts: no op of that class ran on its own
        cells = []
        for r in rows:
            ms, total = split[r].get(cls, 0.0) * 1e3, sum(split[r].values()) * 1e3
            cells.append(f"{ms:8.1f} ({100 * ms / total:3.0f}%)" if total else "-")
        lines.append(f"{cls:<{width}}" + "".join(f"{c:>16}" for c in cells))
    lines.append("-" * len(head))
    sums = [f"{sum(split[r].values()) * 1e3:8.1f}" for r in rows]
    title = f"sum, with barriers ({calls} timed module calls)" if calls else "sum, with barriers"
    lines.append(f"{title:<{width}}" + "".join(f"{c:>16}" for c in sums))
    steps = [f"{real[r][0] * 1e3:8.1f}" for r in rows]
    lines.append(f"{'real step, no barriers':<{width}}" + "".join(f"{c:>16}" for c in steps))
    builds = [f"{real[r][1] * 1e3:8.1f}" for r in rows]
    lines.append(f"{'  of which graph building':<{width}}" + "".join(f"{c:>16}" for c in builds))
    per_tok = [f"{real[r][0] * 1e3 / r:8.1f}" for r in rows]
    lines.append(f"{'real ms per token':<{width}}" + "".join(f"{c:>16}" for c in per_tok))
    lines += [
        "",
        "Barriers (an mx.eval around every submodule) stop MLX from overlapping and fusing ops",
        "across modules and add an eval each, so the barriered sum differs from the real step:",
        "read the split, not the sum. Sampling is timed after the logits exist. MLX's own op",
        "dispatch inside an eval counts in that op's class; Python is graph building only.",
    ]
    return "\n".join(lines)
