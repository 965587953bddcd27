"""Per-request sampling inside one batch: each row has its own parameters and its own PRNG key,
so a seeded request draws the same tokens whatever else shares the batch."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import mlx.core as mx

from engine.types import SamplingParams
from models import qkernels
from models.fast_math import fast_exp_fused


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
    return bool(
        p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or p.logits_processors
    )


def apply_token_mask(logits: mx.array, bitmask: mx.array) -> mx.array:
    """Logits where the packed bitmask [B, W] int32 (bit j of word w: token 32w + j) allows,
    -inf elsewhere. Plain MLX ops, so CPU, Metal and CUDA share it; an all-ones row (a free
    row) leaves its logits bit for bit as they were."""
    V = logits.shape[-1]
    shifts = mx.arange(32, dtype=mx.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :V] != 0
    return mx.where(allowed, logits, -mx.inf)


def sample(logits: mx.array, rows: list[RowState], bitmask: mx.array | None = None) -> SampleResult:
    """Pick one token per row of `logits` [B, V]; advances each row's key and history.
    `bitmask` (packed, one row per row, all ones for free rows) constrains grammar rows.

    Vectorized across rows. On the CPU a draw is one kernel op (kernels/sample.cpp); elsewhere
    it is frugal with whole-vocabulary work (exp and sort over 49k+ columns are slow on some
    backends), so top-k rows draw from their k candidates only and min_p is a threshold in
    logit space."""
    logits = logits.astype(mx.float32)
    if any(needs_history(r.params) or r.params.logit_bias for r in rows):
        logits = mx.stack([_apply_processors(logits[i], r) for i, r in enumerate(rows)])
    if bitmask is not None:
        logits = apply_token_mask(logits, bitmask)
    want_logprobs = any(r.params.logprobs for r in rows)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if want_logprobs else None
    tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        picked = _draw(
            logits[mx.array(drawn)] if len(drawn) < len(rows) else logits, [rows[i] for i in drawn]
        )
        if len(drawn) == len(rows):
            tokens = picked
        else:
            pos = {row: j for j, row in enumerate(drawn)}
            tokens = mx.concatenate(
                [
                    picked[pos[i] : pos[i] + 1] if i in pos else tokens[i : i + 1]
                    for i in range(len(rows))
                ]
            )
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


def sample_positions(
    logits: mx.array, rows: list[RowState], drafts: list[list[int]]
) -> tuple[mx.array, list[mx.array | None]]:
    """Tokens [R, W] at the later positions of a verify pass (`logits` [R, W, V]: position j
    follows each row's first token and drafts[:j + 1]), picked as `sample` would pick each
    token decoding one at a time: logit bias, penalties over the row's history and the drafts
    before the position (its history if they hold), then argmax or the row's draw. Not for
    rows with logits processors (hooks that may keep state).

    A sampled row's draw at position j takes the uniform of the (j + 1)-th split of its key
    after `sample`'s, the one decoding one token a step would take there. Each row's key is
    left as it is; returned per sampled row are its keys after 0 .. W more draws ([W + 1, 2]),
    of which the runner keeps the one after as many draws as the row accepts drafts."""
    R, W, V = logits.shape
    x = logits.astype(mx.float32)
    if any(r.params.logit_bias or r.history for r in rows):
        x = mx.stack([_processed(x[i], r, d) for i, (r, d) in enumerate(zip(rows, drafts))])
    tokens = mx.argmax(x, axis=-1).astype(mx.int32)
    chains: list[mx.array | None] = []
    uniforms = []
    for r in rows:
        if r.params.greedy:
            chains.append(None)
            continue
        key, chain = r.key, [r.key]
        for _ in range(W):
            key, sub = mx.random.split(key)
            chain.append(key)
            uniforms.append(mx.random.uniform(shape=(1,), key=sub))
        chains.append(mx.stack(chain))
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        flat = x[mx.array(drawn)].reshape(len(drawn) * W, V)
        u = mx.concatenate(uniforms)
        picked = _draw(flat, [rows[i] for i in drawn for _ in range(W)], u).reshape(-1, W)
        if len(drawn) == R:
            tokens = picked
        else:
            tokens[mx.array(drawn)] = picked
    return tokens, chains


def _processed(x: mx.array, row: RowState, draft: list[int]) -> mx.array:
    """One row's logits [W, V] after its bias and, position by position, its penalties. The
    history ends with position 0's token (`sample` appended it: the first draft, if it holds);
    position k + 1 follows the drafts up to k."""
    x = _biased(x, row.params)
    if not row.history:
        return x
    hist = mx.concatenate(row.history)
    penalized = []
    for k in range(x.shape[0]):
        tail = mx.array(draft[1 : k + 1], dtype=mx.int32)
        penalized.append(_penalize(x[k], mx.concatenate([hist, tail]), row.params))
    return mx.stack(penalized)


def _biased(x: mx.array, p: SamplingParams) -> mx.array:
    """Logits [..., V] plus the request's logit bias, at every position."""
    if not p.logit_bias:
        return x
    ids = mx.array(list(p.logit_bias.keys()), dtype=mx.int32)
    bias = mx.array(list(p.logit_bias.values()), dtype=mx.float32)
    return x.at[..., ids].add(bias)


def _draw(logits: mx.array, rows: list[RowState], u: mx.array | None = None) -> mx.array:
    """Temperature, top_k, min_p, top_p, then a draw with each row's own key (or with the
    uniforms `u` [B] given): one kernel op on the CPU, MLX ops elsewhere."""
    u = _uniforms(rows) if u is None else u
    V = logits.shape[-1]
    # top_k past the vocabulary means no top_k (and stays within the kernel's int range)
    params = [
        [p.temperature, p.top_k if 0 < p.top_k < V else 0, p.top_p, p.min_p]
        for p in (r.params for r in rows)
    ]
    tokens = qkernels.sample_tokens(logits, params, u)
    return tokens if tokens is not None else _draw_mlx(logits, rows, u)


def _uniforms(rows: list[RowState]) -> mx.array:
    """[B]: one uniform per row from the row's own key (which advances)."""
    uniforms = []
    for r in rows:
        r.key, sub = mx.random.split(r.key)
        uniforms.append(mx.random.uniform(shape=(1,), key=sub))
    return uniforms[0] if len(uniforms) == 1 else mx.concatenate(uniforms)


def _draw_mlx(logits: mx.array, rows: list[RowState], u: mx.array) -> mx.array:
    """`_draw` in MLX ops: exp and sort over the vocabulary are kept to a few passes."""
    V = logits.shape[-1]
    x = logits / mx.array([[r.params.temperature] for r in rows], dtype=mx.float32)
    ks = [r.params.top_k if 0 < r.params.top_k < V else 0 for r in rows]
    ids = None  # candidate ids when every row is top-k limited: work on k columns, not V
    if all(ks):
        kmax = max(ks)
        ids = mx.argpartition(-x, kth=kmax - 1, axis=-1)[:, :kmax]
        x = mx.take_along_axis(x, ids, axis=-1)
        order = mx.argsort(-x, axis=-1)  # small: kmax columns
        ids, x = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(x, order, axis=-1)
        x = mx.where(mx.arange(kmax)[None, :] < mx.array(ks)[:, None], x, -mx.inf)
    elif any(ks):  # mixed rows: a threshold at each row's k-th largest value
        kmax = max(ks)
        top = mx.sort(mx.topk(x, kmax, axis=-1), axis=-1)[:, ::-1]
        kth = mx.take_along_axis(top, mx.array([[max(k, 1) - 1] for k in ks]), axis=-1)
        kth = mx.where(mx.array(ks)[:, None] > 0, kth, -mx.inf)
        x = mx.where(x < kth, -mx.inf, x)
    min_ps = [r.params.min_p for r in rows]
    if any(min_ps):  # p < min_p * p_max  <=>  x < x_max + log(min_p)
        floor = mx.array([[math.log(m) if m > 0 else -math.inf] for m in min_ps])
        x = mx.where(x < x.max(axis=-1, keepdims=True) + floor, -mx.inf, x)
    top_ps = [r.params.top_p for r in rows]
    if any(p < 1.0 for p in top_ps):
        x = _top_p(x, mx.array([[p] for p in top_ps], dtype=mx.float32), ids is not None)
    # Inverse-CDF draw against the cumulative of exp(x - max). The polynomial exp keeps this
    # cheap where MLX's exp is slow.
    probs = fast_exp_fused(x - x.max(axis=-1, keepdims=True))
    cdf = mx.cumsum(probs, axis=-1)
    target = u[:, None] * cdf[:, -1:]
    choice = mx.minimum((cdf <= target).sum(axis=-1), x.shape[-1] - 1)
    if ids is not None:
        choice = mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(mx.int32)


def _apply_processors(logits: mx.array, row: RowState) -> mx.array:
    p = row.params
    logits = _biased(logits, p)
    if p.logits_processors:
        every = mx.concatenate(row.history)
        for proc in p.logits_processors:
            logits = proc(every, logits[None])[0]
    if row.history:
        logits = _penalize(logits, mx.concatenate(row.history), p)
    return logits


def _penalize(logits: mx.array, hist: mx.array, p: SamplingParams) -> mx.array:
    """Repetition, presence and frequency penalties on logits [V] for the tokens `hist`."""
    if p.repeat_last_n > 0:
        hist = hist[-p.repeat_last_n :]
    if p.repetition_penalty != 1.0:
        seen = logits[hist]
        # a scatter *set*: an id seen many times is penalized once, as in HF and llama.cpp
        logits[hist] = mx.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        counts = mx.zeros(logits.shape, mx.float32).at[hist].add(1.0)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return logits


TOP_P_CANDIDATES = 1024


def _top_p(x: mx.array, top_p: mx.array, sorted_desc: bool) -> mx.array:
    """Keep each row's smallest set of tokens whose probability reaches top_p (the first stays).

    Over a whole vocabulary the cut is found among the 1,024 most likely tokens (a partition,
    not a sort of 49k+ columns); a row so flat that those hold less than top_p keeps everything."""
    if sorted_desc:
        xs = x
    else:
        m = min(TOP_P_CANDIDATES, x.shape[-1])
        xs = mx.take_along_axis(x, mx.argpartition(-x, kth=m - 1, axis=-1)[:, :m], axis=-1)
        xs = -mx.sort(-xs, axis=-1)
    # logsumexp over the whole vocabulary on the polynomial exp: MLX's (23 ns an element on the
    # CPU) made this 3/4 of a 16-row top_p draw (18 of 24 ms CPU time, 49k vocabulary).
    top = x.max(axis=-1, keepdims=True)
    lse = top + mx.log(fast_exp_fused(x - top).sum(axis=-1, keepdims=True))
    probs = mx.exp(xs - lse)
    cum = mx.cumsum(probs, axis=-1)
    keep = (cum - probs) < top_p
    cut = mx.where(keep, xs, mx.inf).min(axis=-1, keepdims=True)
    cut = mx.where(cum[:, -1:] >= top_p, cut, -mx.inf)
    return mx.where(x < cut, -mx.inf, x)
