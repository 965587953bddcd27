"""A step's new prompts cut to fit the prefill budget: batches of prompts, pieces of one."""

from types import SimpleNamespace
from typing import Any

from engine import prefill_plan
from engine.prefill_plan import MIN_PIECE


def quadratic(rows: int, width: int, keys: int) -> int:
    return rows * width * (10 + keys)  # activations and attention scores


def test_a_prompt_is_cut_into_the_widest_pieces_within_the_budget() -> None:
    budget = 300 * (10 + 300)
    cut = prefill_plan.pieces(0, 1000, quadratic, budget)
    assert cut[0] == (0, 300) and cut[-1][1] == 1000
    assert all(a == b for (_, a), (b, _) in zip(cut, cut[1:]))  # consecutive, no gap
    for a, b in cut:
        assert quadratic(1, b - a, b) <= budget  # later pieces attend over more keys
        if b < 1000:
            assert quadratic(1, b - a + 1, b + 1) > budget  # and are the widest that fit


def test_pieces_are_whole_when_they_fit_and_never_tiny() -> None:
    assert prefill_plan.pieces(5, 90, quadratic, 10**9) == [(5, 90)]
    assert prefill_plan.pieces(0, 0, quadratic, 10**9) == []
    cut = prefill_plan.pieces(0, 200, quadratic, 1)  # nothing fits: the smallest pieces
    assert cut == [(0, MIN_PIECE), (MIN_PIECE, 2 * MIN_PIECE), (128, 192), (192, 200)]


def test_prompts_batch_shortest_first_within_the_budget() -> None:
    fresh: list[Any] = [
        SimpleNamespace(seq=SimpleNamespace(num_prefill=n), start=0) for n in (9, 5, 7, 6, 30)
    ]
    out = prefill_plan.batches(fresh, lambda rows, width, keys: rows * width, 16)
    assert [[s.seq.num_prefill for s in b] for b in out] == [[5, 6], [7, 9], [30]]
