"""Per-request sampling inside one batch: each row has its own parameters and its own PRNG key,
so a seeded request draws the same tokens whatever else shares the batch."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import mlx.core as mx

from engine.types import SamplingParams


@dataclass
class RowState:
    """What sampling remembers about one sequence between steps (all MLX values stay lazy)."""

    params: SamplingParams
    key: mx.array
    history: list[mx.array] = field(default_factory=list)  # token ids, for penalties only

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int]) -> RowState:
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        history = [mx.array(prompt_ids, dtype=mx.int32)] if needs_history(params) else []
        return cls(params, mx.random.key(seed), history)


@dataclass
class SampleResult:
    tokens: mx.array  # [B] int32
    logprobs: mx.array | None = None  # [B] logprob of each chosen token
    top_ids: mx.array | None = None  # [B, K]
    top_logprobs: mx.array | None = None  # [B, K]

    def arrays(self) -> list[mx.array]:
        return [
            a
            for a in (self.tokens, self.logprobs, self.top_ids, self.top_logprobs)
            if a is not None
        ]


def needs_history(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _plain_greedy(p: SamplingParams) -> bool:
    return p.greedy and not needs_history(p) and not p.logit_bias


def sample(logits: mx.array, rows: list[RowState]) -> SampleResult:
    """Pick one token per row of `logits` [B, V]; advances each row's key and history."""
    logits = logits.astype(mx.float32)
    want_logprobs = any(r.params.logprobs for r in rows)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if want_logprobs else None
    if all(_plain_greedy(r.params) for r in rows):
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    else:
        tokens = mx.concatenate([_sample_row(logits[i], r) for i, r in enumerate(rows)])
    for i, r in enumerate(rows):
        if r.history:
            r.history.append(tokens[i : i + 1])
    result = SampleResult(tokens)
    if logprobs is not None:
        result.logprobs = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        k = max(r.params.top_logprobs for r in rows)
        if k > 0:
            top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            result.top_ids = top
            result.top_logprobs = mx.take_along_axis(logprobs, top, axis=-1)
    return result


def _sample_row(logits: mx.array, row: RowState) -> mx.array:
    p = row.params
    logits = _apply_processors(logits, row)
    if p.greedy:
        return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
    logits = logits / p.temperature
    logits = _filter(logits, p)
    row.key, sub = mx.random.split(row.key)
    return mx.random.categorical(logits, key=sub)[None].astype(mx.int32)


def _apply_processors(logits: mx.array, row: RowState) -> mx.array:
    p = row.params
    if p.logit_bias:
        ids = mx.array(list(p.logit_bias.keys()), dtype=mx.int32)
        bias = mx.array(list(p.logit_bias.values()), dtype=mx.float32)
        logits = logits.at[ids].add(bias)
    if row.history:
        hist = mx.concatenate(row.history)
        if p.repeat_last_n > 0:
            hist = hist[-p.repeat_last_n :]
        if p.repetition_penalty != 1.0:
            seen = logits[hist]
            # a scatter *set*: an id seen many times is penalized once, as in HF and llama.cpp
            logits[hist] = mx.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if p.presence_penalty or p.frequency_penalty:
            counts = mx.zeros(logits.shape, mx.float32).at[hist].add(1.0)
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return logits


def _filter(logits: mx.array, p: SamplingParams) -> mx.array:
    """top_k, then top_p and min_p, as masks on the temperature-scaled logits."""
    neg_inf = mx.array(-float("inf"), dtype=logits.dtype)
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-p.top_k]
        logits = mx.where(logits < kth, neg_inf, logits)
    if p.min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < p.min_p * probs.max(), neg_inf, logits)
    if p.top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        order = mx.argsort(-probs)
        sorted_probs = probs[order]
        cum = mx.cumsum(sorted_probs)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        keep_sorted = (cum - sorted_probs) < p.top_p
        keep = keep_sorted[mx.argsort(order)]  # back to vocabulary order
        logits = mx.where(keep, logits, neg_inf)
    return logits
