"""Speculative sampling on synthetic logits: a 'model' whose next-token logits depend on the
last token only (a table), so the exact distribution of two tokens is known. Thousands of
seeded rows verify a fixed draft in one batch; their first two tokens must follow the sampler's
distribution (a chi-square bound an always-accepting rule fails) and equal, seed for seed, the
tokens decoding one at a time draws."""

import mlx.core as mx
import numpy as np
import pytest

from engine import speculative
from engine.sampling import RowState, sample
from engine.speculative import verify_rows
from engine.types import SamplingParams
from tests.unit import test_sampling_draw

V = 6
ROWS = 1000
START = 0
TABLE = np.array(
    [[1.0, 2.2, 0.3, 1.9, -0.5, 0.8]]
    + [np.roll([2.0, 1.1, 0.2, -0.4, 1.5, 0.6], i).tolist() for i in range(1, V)],
    dtype=np.float32,
)
CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=0.9, top_p=0.85, min_p=0.05),
    SamplingParams(temperature=1.0, logit_bias={5: 1.5, 1: -1.0}),
    SamplingParams(temperature=0.8, repetition_penalty=1.8, frequency_penalty=0.5),
]


def exact(logits: np.ndarray, p: SamplingParams, seen: tuple[int, ...] = ()) -> np.ndarray:
    """The sampler's distribution over `logits` after the tokens `seen`: logit bias first,
    then the penalties, as the sampler applies them."""
    x = logits.astype(np.float64)
    for token, bias in p.logit_bias.items():
        x[token] += bias
    for t in set(seen):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * seen.count(t) + p.presence_penalty
    return test_sampling_draw.exact(x, p)


def logits_after(tokens: mx.array) -> mx.array:
    return mx.array(TABLE)[tokens]


def rows_for(p: SamplingParams, n: int = ROWS) -> list[RowState]:
    params = [SamplingParams(**{**vars(p), "seed": seed}) for seed in range(n)]
    return [RowState.create(q, []) for q in params]


def decode_one_at_a_time(p: SamplingParams, n: int = ROWS) -> np.ndarray:
    """[n, 2]: each row's first two tokens, one sample() a token."""
    rows = rows_for(p, n)
    first = sample(logits_after(mx.full((n,), START, mx.int32)), rows).tokens
    second = sample(logits_after(first), rows).tokens
    return np.array(mx.stack([first, second], axis=1))


def decode_with_draft(
    p: SamplingParams, draft: list[int], n: int = ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """[n, 2]: one verify pass of `draft` per row, then single steps for what it lacks; and
    the drafts each row accepted."""
    rows = rows_for(p, n)
    inputs = mx.array([[START, *draft]] * n, dtype=mx.int32)
    logits = logits_after(inputs)  # [ROWS, 1 + D, V]: position j follows inputs[:, j]
    first = sample(logits[:, 0, :], rows).tokens
    v = verify_rows(logits, inputs, first, [draft] * n, rows)
    tokens, accepted = np.array(v.tokens), np.array(v.accepted)
    single = np.array(sample(logits_after(v.next), rows).tokens)
    return np.array(
        [t[:2] if a >= 1 else [t[0], s] for t, a, s in zip(tokens, accepted, single)]
    ), accepted


def pair_distribution(p: SamplingParams) -> np.ndarray:
    """[V, V]: the exact probability of the first two tokens."""
    first = exact(TABLE[START], p)
    return first[:, None] * np.stack([exact(TABLE[t], p, (t,)) for t in range(V)])


def chi_square(pairs: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Pearson's statistic of the pairs against `want` (cells expecting fewer than 5 pooled)
    and its cutoff at p = 0.0002 (Wilson-Hilferty)."""
    counts = np.zeros((V, V))
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    expected = want * len(pairs)
    assert counts[expected == 0].sum() == 0, "a token the sampler can never pick"
    big = expected >= 5
    obs = [*counts[big], counts[~big & (expected > 0)].sum()]
    exp = [*expected[big], expected[~big & (expected > 0)].sum()]
    cells = [(o, e) for o, e in zip(obs, exp) if e > 0]
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    z = 3.54  # the normal's 0.9998 quantile
    return float(stat), df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "case, draft",
    [(c, d) for c in range(len(CASES)) for d in ([1, 2], [3, 0, 4])] + [(2, [5])],  # 5: cut
    ids=str,
)
def test_drafted_tokens_follow_the_sampler_distribution(case: int, draft: list[int]):
    p = CASES[case]
    pairs, accepted = decode_with_draft(p, draft)
    # The first draft is accepted with the probability the sampler gives it (0: never).
    p_first = exact(TABLE[START], p)[draft[0]]
    assert abs((accepted >= 1).mean() - p_first) <= 4 * np.sqrt(p_first * (1 - p_first) / ROWS)
    assert accepted.mean() < len(draft)
    stat, cutoff = chi_square(pairs, pair_distribution(p))
    assert stat < cutoff


@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_seeded_row_draws_the_same_tokens_with_and_without_drafts(case: int):
    p = CASES[case]
    plain = decode_one_at_a_time(p, 200)
    for draft in ([1, 2], [3, 0, 4], [2, 2, 2, 2]):
        assert np.array_equal(decode_with_draft(p, draft, 200)[0], plain), draft


def test_an_acceptance_rule_that_ignores_the_distribution_fails_the_bound(monkeypatch):
    """The test above can fail: accepting every draft (or a draft whenever it is the greedy
    token) skews the tokens far past the bound."""
    p, draft = CASES[0], [1, 2]
    real = speculative.verify

    def always(logits, inputs, first, drafts, picked=None):
        v = real(logits, inputs, first, drafts, picked)
        tokens = mx.concatenate([inputs[:, 1:], v.tokens[:, -1:]], axis=1)
        tokens[:, 0] = first  # position 0 is the sampled token, as ever
        full = mx.array([len(d) for d in drafts])
        return speculative.Verified(tokens, full, tokens[:, -1])

    monkeypatch.setattr(speculative, "verify", always)
    pairs, _ = decode_with_draft(p, draft)
    stat, cutoff = chi_square(pairs, pair_distribution(p))
    assert stat > 10 * cutoff


def test_greedy_rows_beside_sampled_ones_keep_the_argmax():
    rows = [RowState.create(SamplingParams(temperature=0), []), *rows_for(CASES[0])[:3]]
    inputs = mx.array([[START, 1, 2]] * 4, dtype=mx.int32)
    logits = logits_after(inputs)
    first = sample(logits[:, 0, :], rows).tokens
    v = verify_rows(logits, inputs, first, [[1, 2]] * 4, rows)
    greedy = [int(np.argmax(TABLE[t])) for t in (START, 1, 2)]
    assert np.array(v.tokens)[0].tolist() == greedy
