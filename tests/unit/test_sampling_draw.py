"""The draw (temperature, top_k, min_p, top_p, then one uniform per row) on both of its paths,
the CPU kernel op and the MLX ops, against the exact distribution on a small vocabulary."""

import math

import mlx.core as mx
import numpy as np
import pytest

from engine import sampling
from engine.sampling import RowState
from engine.types import SamplingParams
from models import qkernels

V = 37
DRAWS = 4000


def _kernel(logits: mx.array, rows: list[RowState]) -> mx.array:
    return sampling._draw(logits, rows)


def _mlx(logits: mx.array, rows: list[RowState]) -> mx.array:
    return sampling._draw_mlx(logits, rows, sampling._uniforms(rows))


PATHS = [
    pytest.param(
        _kernel,
        id="kernel",
        marks=pytest.mark.skipif(not qkernels.available(), reason="kernels not built"),
    ),
    pytest.param(_mlx, id="mlx"),
]
CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.6, top_k=5),
    SamplingParams(temperature=0.8, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=12, top_p=0.9, min_p=0.02),
]


def exact(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution a draw must follow, by the definitions (float64, full sorts)."""
    x = logits.astype(np.float64) / p.temperature
    if 0 < p.top_k < len(x):
        x = np.where(x < np.sort(x)[-p.top_k], -np.inf, x)
    if p.min_p > 0:
        x = np.where(x < x.max() + math.log(p.min_p), -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        keep = np.zeros(len(x), dtype=bool)
        keep[order[before < p.top_p]] = True
        keep[order[0]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


def counts(
    draw, logits: np.ndarray, params: SamplingParams, seed: int, n: int = DRAWS
) -> np.ndarray:
    """n draws from one batch of n rows, each with its own seeded key."""
    rows = [
        RowState.create(SamplingParams(**{**vars(params), "seed": seed + i}), []) for i in range(n)
    ]
    batch = mx.broadcast_to(mx.array(logits)[None], (n, len(logits)))
    tokens = np.array(draw(batch, rows).tolist())
    return np.bincount(tokens, minlength=len(logits))


@pytest.mark.parametrize("draw", PATHS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_draws_follow_the_exact_distribution(draw, case: int):
    params = CASES[case]
    logits = np.random.default_rng(case).normal(0.0, 1.0, V).astype(np.float32)
    want = exact(logits, params)
    got = counts(draw, logits, params, seed=1000 * case)
    assert got[want == 0].sum() == 0, "a filtered-out token was drawn"
    live = want > 0
    expected = want[live] * DRAWS
    chi2 = float(((got[live] - expected) ** 2 / expected).sum())
    df = int(live.sum()) - 1
    # Far above the 0.9999 quantile of chi-square(df): a wrong filter or temperature is off by
    # hundreds to thousands at 4,000 draws.
    assert chi2 < df + 5 * math.sqrt(2 * df) + 10, (chi2, df)


@pytest.mark.skipif(not qkernels.available(), reason="kernels not built")
@pytest.mark.parametrize("case", [0, 1, 3, 4])  # no top_k: both paths draw by id order
def test_kernel_and_mlx_ops_pick_the_same_token_for_the_same_uniform(case: int):
    params = CASES[case]
    logits = mx.array(np.random.default_rng(7).normal(0.0, 2.0, (200, 500)).astype(np.float32))
    rows = [RowState.create(SamplingParams(**{**vars(params), "seed": i}), []) for i in range(200)]
    u = sampling._uniforms(rows)
    ops = sampling._draw_mlx(logits, rows, u).tolist()
    kernel = qkernels.sample_tokens(
        logits, [[params.temperature, 0, params.top_p, params.min_p]] * 200, u
    )
    assert kernel is not None
    same = sum(a == b for a, b in zip(ops, kernel.tolist()))
    assert same >= 198  # only a uniform on a float rounding boundary may land apart


@pytest.mark.skipif(not qkernels.available(), reason="kernels not built")
def test_kernel_top_p_is_exact_on_a_flat_vocabulary():
    """Where the nucleus spans thousands of tokens the kernel still cuts at exactly top_p."""
    logits = np.random.default_rng(3).normal(0.0, 0.05, 5000).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.5)
    want = exact(logits, params)
    got = counts(_kernel, logits, params, seed=5, n=1000)
    assert got[want == 0].sum() == 0
    assert (want > 0).sum() > 2000


def test_seeded_rows_repeat_their_draws_whatever_shares_the_batch():
    logits = mx.array(np.random.default_rng(1).normal(0.0, 2.0, (3, V)).astype(np.float32))
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=42)

    def run(others: list[SamplingParams]) -> list[int]:
        rows = [RowState.create(p, [])] + [RowState.create(o, []) for o in others]
        return [sampling._draw(logits[: len(rows)], rows).tolist()[0] for _ in range(30)]

    alone = run([])
    assert alone == run([SamplingParams(temperature=1.3, top_k=3, seed=7)])
    assert alone == run([SamplingParams(temperature=0.5, seed=8), SamplingParams(min_p=0.3)])


@pytest.mark.skipif(not qkernels.available(), reason="kernels not built")
@pytest.mark.parametrize(
    "row",
    [
        [math.inf] + [0.0] * (V - 1),  # an infinite logit: exp(x - top) is NaN everywhere
        [math.nan] * V,
        [math.nan] + [0.0] * (V - 1),
        [-math.inf] * V,  # every token masked
        [3e38] * V,
    ],
    ids=["+inf", "all-nan", "one-nan", "all-masked", "huge"],
)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.5, min_p=1.0),
        SamplingParams(temperature=1e-8, top_p=0.5),
        SamplingParams(temperature=0.7, top_k=10**12, top_p=1e-9),
        SamplingParams(temperature=100.0, top_k=1, top_p=0.0),
    ],
)
def test_kernel_draws_a_token_id_from_degenerate_logits(row: list[float], params: SamplingParams):
    """Logits a broken model or a tiny temperature can produce never crash the draw (an empty
    top_p bin once read past a vector's end) and always give an id in the vocabulary."""
    rows = [RowState.create(SamplingParams(**{**vars(params), "seed": s}), []) for s in range(3)]
    tokens = sampling._draw(mx.broadcast_to(mx.array([row], dtype=mx.float32), (3, V)), rows)
    assert all(0 <= t < V for t in tokens.tolist())
    if row[0] == math.inf:
        assert tokens.tolist() == [0, 0, 0]
