"""The batched sampler: filters keep exactly the right tokens; draws follow the distribution."""

import math
from collections import Counter

import mlx.core as mx

from engine.sampling import RowState, sample
from engine.types import SamplingParams

LOGITS = [math.log(p) for p in (0.5, 0.25, 0.15, 0.07, 0.03)]


def draws(params: SamplingParams, n: int = 2000, batch_with_greedy: bool = True) -> Counter:
    row = RowState.create(params, [])
    rows = [row, RowState.create(SamplingParams(temperature=0), [])] if batch_with_greedy else [row]
    logits = mx.array([LOGITS] * len(rows))
    counts: Counter = Counter()
    for _ in range(n):
        out = sample(logits, rows).tokens.tolist()
        counts[out[0]] += 1
        if batch_with_greedy:
            assert out[1] == 0  # the greedy row beside it is untouched
    return counts


def test_temperature_one_follows_the_distribution():
    c = draws(SamplingParams(temperature=1.0, seed=1))
    for tok, p in enumerate((0.5, 0.25, 0.15, 0.07, 0.03)):
        assert abs(c[tok] / 2000 - p) < 0.04, (tok, c)


def test_top_k_keeps_only_k():
    c = draws(SamplingParams(temperature=1.0, top_k=2, seed=2))
    assert set(c) == {0, 1}
    assert abs(c[0] / 2000 - 2 / 3) < 0.05


def test_top_p_keeps_the_smallest_set_reaching_p():
    c = draws(SamplingParams(temperature=1.0, top_p=0.7, seed=3))  # 0.5 + 0.25 reaches 0.7
    assert set(c) == {0, 1}
    c = draws(SamplingParams(temperature=1.0, top_k=4, top_p=0.85, seed=4))  # needs 3 tokens
    assert set(c) == {0, 1, 2}


def test_min_p_is_relative_to_the_most_likely():
    c = draws(SamplingParams(temperature=1.0, min_p=0.2, seed=5))  # keeps p >= 0.1
    assert set(c) == {0, 1, 2}


def test_same_seed_same_draws_different_seed_differs():
    def forty(seed: int) -> list[int]:
        row = RowState.create(SamplingParams(seed=seed), [])
        return [sample(mx.array([LOGITS]), [row]).tokens.item() for _ in range(40)]

    assert forty(9) == forty(9)  # the whole sequence, not just its first draw
    assert forty(9) != forty(10)


def test_repetition_penalty_and_logit_bias():
    row = RowState.create(SamplingParams(temperature=0, repetition_penalty=100.0), [0])
    assert sample(mx.array([[2.0, 1.0, 0.0]]), [row]).tokens.item() == 1  # 0 was seen
    row = RowState.create(SamplingParams(temperature=0, logit_bias={2: 10.0}), [])
    assert sample(mx.array([[2.0, 1.0, 0.0]]), [row]).tokens.item() == 2


def test_logits_processor_hook_sees_history_and_steers():
    seen = []

    def only_token_3(tokens, logits):
        seen.append(tokens.tolist())
        mask = mx.full(logits.shape, -mx.inf)
        mask[..., 3] = 0.0
        return logits + mask

    row = RowState.create(SamplingParams(temperature=1.0, logits_processors=[only_token_3]), [7, 8])
    out = [sample(mx.array([LOGITS]), [row]).tokens.item() for _ in range(3)]
    assert out == [3, 3, 3]
    assert seen[0] == [7, 8] and seen[2] == [7, 8, 3, 3]
