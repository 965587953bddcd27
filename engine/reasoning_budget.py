"""A thinking budget: after `budget` tokens of thinking the model's end marker is forced, so the
answer follows (llama.cpp's reasoning budget; Anthropic's `thinking.budget_tokens`)."""

from __future__ import annotations

import mlx.core as mx


class ReasoningBudget:
    """A logits processor (mlx-lm's signature: token_ids = prompt and output so far, logits
    [1, V]). Lazy: it reads no token on the host, only the output's length, which is known."""

    def __init__(
        self, n_prompt: int, start_ids: list[int], end_ids: list[int], budget: int, opened: bool
    ):
        self.n_prompt = n_prompt
        self.start = start_ids
        self.end = end_ids
        self.opened = opened  # the prompt opened the thinking block
        # Output position where the end marker is due: the budget counts thinking tokens only.
        self.limit = max(0, budget) + (0 if opened else len(start_ids))

    def __call__(self, token_ids: mx.array, logits: mx.array) -> mx.array:
        k = token_ids.shape[0] - self.n_prompt - self.limit  # the end marker's token due now
        if not 0 <= k < len(self.end):
            return logits
        out = token_ids[self.n_prompt :]
        thinking = out[: self.limit]
        force = mx.logical_not(mx.any(thinking == self.end[0]))  # it did not end by itself
        if not self.opened:  # it thinks only if the output opened the block
            head = out[: len(self.start)]
            force = mx.logical_and(force, mx.all(head == mx.array(self.start, dtype=head.dtype)))
        only = mx.arange(logits.shape[-1]) == self.end[k]
        forced = mx.where(only, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf, logits.dtype))
        return mx.where(force, forced, logits)
