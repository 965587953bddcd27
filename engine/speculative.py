"""Verifying drafts inside the decode batch (the MLX side of speculative decoding).

A step with drafts feeds every row 1 + D tokens: its next token, its draft, and filler up to the
widest draft (rows without one carry filler only). Causal attention keeps filler from touching a
row's real positions, and everything a row did not accept is cut from its KV afterwards.

Each position's token is picked as decoding one token a step would pick it there (the greedy
token, or the row's draw: sampling.sample_positions); a row accepts the leading drafts that
equal the token picked at the position before, and its tokens are those and the one picked
after them. For a sampled row this is speculative sampling (Leviathan et al., Chen et al.)
with a one-hot draft distribution: drawing t ~ p and accepting draft d iff t = d accepts with
probability p(d), and on a reject emits t ~ p(. | t != d), the residual max(0, p - q)
renormalized; after the last accepted draft, the token drawn at the next position is the bonus
token. Every emitted token follows the sampler's own distribution, and since position j draws
with the uniform decoding would use for that token, a seeded row picks the same tokens with
or without drafts wherever the verify pass computes the logits a one-token step would.

mlx-lm's BatchKVCache trims every row alike; `BatchKVCache.trim_rows` below trims each row by
its own count. Rotating (sliding-window) caches wrap per row and are not trimmed per row: models
with them do not speculate.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from engine.outputs import ScheduledSeq
from engine.sampling import RowState, sample_positions
from models import qkernels

FILLER = 0  # any id: filler positions are computed, never read, and cut from the KV


class BatchKVCache(mlx_cache.BatchKVCache):
    """mlx-lm's left-padded batch cache, plus a per-row trim, grown in smaller steps, updated in
    one op on the CPU.

    Every row holds the batch's room to grow: mlx-lm's 256 positions left 128 unused a row on
    average (188 MB over 32 rows of SmolLM2's float32 KV). 64 keep 32; growing copies the
    cache 4 times as often, as each row joining or leaving the batch does anyway."""

    step = 64

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # mlx-lm's update is six graph nodes a layer a step (offset add and broadcast, two slice
        # updates, two slices); mlxd's kernel does the same writes in one (in place when MLX
        # could donate the buffers). Growing the buffers, other devices: mlx-lm's own.
        if self.keys is not None:
            out = qkernels.kv_update(self.keys, self.values, self.offset, keys, values, self._idx)
            if out is not None:
                self.keys, self.values, self.offset, k, v = out
                self._idx += keys.shape[2]
                return k, v
        return super().update_and_fetch(keys, values)

    def decode_slot(self, n: int = 1) -> tuple[mx.array, mx.array, mx.array, int] | None:
        """For an op that writes `n` positions a row itself (a decode step's one, a verify
        pass's token and drafts: models/fused_block.py, fused_stack.py): the buffers, offset
        and first position (keys, values, offset, idx) to write at, the buffers grown first
        where there is no room (as mlx-lm's update grows them); None before the first update.
        The cache then takes the op's results with `adopt_slot`."""
        if self.keys is None:
            return None
        if self._idx + n > self.keys.shape[2]:
            self._grow(n)
        return self.keys, self.values, self.offset, self._idx

    def _grow(self, n: int) -> None:
        # mlx-lm's update_and_fetch's growth: whole steps of zeros past what is written.
        held: tuple[mx.array, mx.array] = (self.keys, self.values)  # type: ignore[assignment]
        idx, steps = self._idx, (self.step + n - 1) // self.step * self.step
        grown = []
        for buf in held:
            B, H, _, D = buf.shape
            grown.append(
                mx.concatenate([buf[..., :idx, :], mx.zeros((B, H, steps, D), buf.dtype)], 2)
            )
        self.keys, self.values = grown  # type: ignore[assignment]  # mlx-lm's None-typed

    def adopt_slot(self, keys: mx.array, values: mx.array, offset: mx.array, n: int = 1) -> None:
        """The buffers with the `n` positions `decode_slot` gave written, and the offset after
        them (one array for every layer's cache of a fused stack: replaced, never changed in
        place, as mlx-lm's batch cache does)."""
        self.keys, self.values = keys, values  # type: ignore[assignment]  # mlx-lm's None-typed
        self.offset = offset
        self._idx += n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        # A decode step's one query position sees every key but its row's left padding: the
        # mask mlx-lm's create_causal_mask gives ([B, 1, 1, T]) in 3 ops instead of ~12.
        if N == 1 and kwargs.get("window_size") is None and self._right_padding is None:
            keys = mx.arange(self._idx + 1)
            return mx.expand_dims(self.left_padding, (1, 2, 3)) <= keys
        return super().make_mask(N, return_array=return_array, **kwargs)

    @classmethod
    def merge(cls, caches: list) -> BatchKVCache:
        merged = super().merge(caches)
        # mlx-lm makes an empty merge of its own class: keep this one.
        return merged if isinstance(merged, cls) else cls([0] * len(caches))

    def trim_rows(self, counts: list[int]) -> None:
        """Drop the last `counts[i]` entries of row i. What all rows drop is cut from the end;
        a row dropping more is shifted right by the difference, its dropped entries wrapping
        into its left padding (masked), so every row still ends at the shared end."""
        shared = min(counts)
        self.trim(shared)
        extra = [c - shared for c in counts]
        if not any(extra) or self.keys is None:
            return
        n = self._idx
        shift = mx.array(extra, dtype=mx.int32)
        for name in ("keys", "values"):
            buf = getattr(self, name)
            buf[..., :n, :] = mlx_cache.dynamic_roll(buf[..., :n, :], shift[:, None], axis=2)
        self.left_padding = self.left_padding + shift
        self.offset = self.offset - shift


def merge(caches: list) -> object:
    """One layer's per-sequence caches as a batch cache (plain KV caches as the trimmable one)."""
    if all(type(c) is mlx_cache.KVCache for c in caches):
        return BatchKVCache.merge(caches)
    return type(caches[0]).merge(caches)


def trimmable(caches: list) -> bool:
    """A model's fresh caches are all plain KV caches (no sliding window): it can speculate."""
    return all(type(c) is mlx_cache.KVCache for c in caches)


def draft_inputs(next_tokens: list[mx.array], drafts: list[list[int]]) -> mx.array:
    """[B, 1 + D]: each row's next token, its draft, then filler."""
    width = max(len(d) for d in drafts)
    tail = mx.array([d + [FILLER] * (width - len(d)) for d in drafts], dtype=mx.int32)
    return mx.concatenate([mx.concatenate(next_tokens)[:, None], tail], axis=1)


@dataclass
class Verified:
    """A verify pass's outcome (lazy): row i's tokens are tokens[i, : accepted[i] + 1]."""

    tokens: mx.array  # [B, 1 + D]
    accepted: mx.array  # [B] drafts accepted
    next: mx.array  # [B] each row's last token: the next step's input

    def arrays(self) -> list[mx.array]:
        return [self.tokens, self.accepted]

    def rejected(self) -> list[int]:
        """Per row, the positions of this pass to cut from the KV (reads `accepted`)."""
        width = self.tokens.shape[1] - 1
        accepted: list[int] = self.accepted.tolist()  # type: ignore[assignment]
        return [width - a for a in accepted]


def verify(
    logits: mx.array,
    inputs: mx.array,
    first: mx.array,
    drafts: list[list[int]],
    picked: tuple[list[int], mx.array] | None = None,
) -> Verified:
    """Accept each row's drafts against `logits` [B, 1 + D, V]. `first` [B] holds the tokens
    sampled at position 0 (as sampling.sample picks them). Positions 1 .. D take the greedy
    token, except the rows of `picked` (rows, their tokens [R, D]: sampled or logit-biased
    rows, picked by sampling.sample_positions)."""
    if picked is not None and len(picked[0]) == len(drafts):
        later = picked[1]
    else:
        later = mx.argmax(logits[:, 1:, :].astype(mx.float32), axis=-1).astype(mx.int32)
        if picked is not None:
            later[mx.array(picked[0])] = picked[1]
    tokens = mx.concatenate([first[:, None], later], axis=1)
    width = inputs.shape[1] - 1
    lengths = mx.array([len(d) for d in drafts], dtype=mx.int32)
    held = (inputs[:, 1:] == tokens[:, :-1]) & (mx.arange(width)[None, :] < lengths[:, None])
    accepted = mx.cumprod(held.astype(mx.int32), axis=1).sum(axis=1)
    nxt = mx.take_along_axis(tokens, accepted[:, None], axis=1)[:, 0]
    return Verified(tokens, accepted, nxt)


def verify_rows(
    logits: mx.array,
    inputs: mx.array,
    first: mx.array,
    drafts: list[list[int]],
    states: list[RowState],
    failed: Collection[int] = (),
) -> Verified:
    """`verify` for a batch whose rows sample as `states` say: the drafting rows that are not
    plain greedy (sampled, logit-biased or penalized) pick their later tokens as
    sample_positions does, and each sampled row's key moves on by one draw per accepted draft
    (`sample` has made position 0's draw)."""
    rows = [
        i
        for i, (st, d) in enumerate(zip(states, drafts))
        if d and i not in failed and not (st.params.greedy and not picks_later(st))
    ]
    if not rows:
        return verify(logits, inputs, first, drafts)
    later, chains = sample_positions(
        logits[mx.array(rows), 1:, :], [states[i] for i in rows], [drafts[i] for i in rows]
    )
    verified = verify(logits, inputs, first, drafts, (rows, later))
    for i, chain in zip(rows, chains):
        if chain is not None:
            states[i].key = mx.take(chain, verified.accepted[i], axis=0)
    return verified


def picks_later(state: RowState) -> bool:
    """A row's tokens at later positions are not the plain argmax: bias or penalties apply."""
    return bool(state.params.logit_bias or state.history)


def sync_history(
    scheduled: list[ScheduledSeq], states: dict[str, RowState], stale: set[str]
) -> set[str]:
    """Penalized rows' token history, for this step: a drafting row's from its tokens (all
    known: a row drafts only with no step in flight), and so a row's whose last step verified
    drafts (its history lacks the accepted ones; that step was read before this one was
    scheduled). Returns the rows whose history is stale after this step: those it leaves
    stale with drafts, and stale ones not scheduled (preempted: synced when they decode)."""
    synced = set()
    for sched in scheduled:
        st = states.get(sched.seq.id)
        if st is not None and st.history and (sched.draft or sched.seq.id in stale):
            st.history = [mx.array(sched.seq.all_token_ids(), dtype=mx.int32)]
            synced.add(sched.seq.id)
    left = {sid for sid in stale - synced if sid in states}
    return left | {s.seq.id for s in scheduled if s.draft and states[s.seq.id].history}
