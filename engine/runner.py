"""Executes the scheduler's decisions over an MLX model: the engine's MLX side.

Decoding sequences are rows of one batch whose per-layer caches are mlx-lm's BatchKVCache /
BatchRotatingKVCache (left-padded; `extend` to join, `filter` to leave). A sequence prefills in
chunks (new prompts of one step together) up to its last prompt token, then joins the batch,
whose decode of that token samples its first. On a GPU every step is queued with
`mx.async_eval` and read back one step later, so the next step's graph is built while this one
computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from engine.grammar import MaskFiller
from engine.prefix_cache import PrefixCache
from engine.sampling import RowState, SampleResult, sample
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence
from engine.types import TokenLogprob


@dataclass
class SampledToken:
    seq: Sequence
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class PromptScores:
    """Log-probabilities of prompt tokens start+1 .. start+n under a prefill chunk (lazy)."""

    seq: Sequence
    token_ids: list[int]
    logprobs: mx.array  # [n]
    top_ids: mx.array | None = None  # [n, K]
    top_logprobs: mx.array | None = None

    def read(self) -> list[SampledToken]:
        lps: list[Any] = self.logprobs.tolist()  # type: ignore[assignment]
        tops: tuple[Any, Any] | None = None
        if self.top_ids is not None and self.top_logprobs is not None:
            tops = (self.top_ids.tolist(), self.top_logprobs.tolist())
        out = []
        for i, (tid, lp) in enumerate(zip(self.token_ids, lps)):
            top = []
            if tops is not None:
                top = sorted(zip(tops[0][i], tops[1][i]), key=lambda t: -t[1])
            out.append(SampledToken(self.seq, tid, lp, [(int(a), float(b)) for a, b in top]))
        return out


@dataclass
class StepResult:
    """The lazy outcome of one step: which sequence reads which row of which sample."""

    samples: list[tuple[Sequence, SampleResult, int]] = field(default_factory=list)
    prompt_scores: list[PromptScores] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.samples and not self.prompt_scores

    def read(self) -> list[SampledToken]:
        """Block until the step's tokens exist and return them (the only sync point)."""
        out: list[SampledToken] = []
        cache: dict[int, list[Any]] = {}
        for seq, res, row in self.samples:
            lists = cache.get(id(res))
            if lists is None:
                lists = [a.tolist() for a in res.arrays()]  # type: ignore[misc]
                cache[id(res)] = lists
            tok = SampledToken(seq, lists[0][row])
            if res.logprobs is not None and seq.params.logprobs:
                tok.logprob = lists[1][row]
                if res.top_ids is not None and seq.params.top_logprobs:
                    pairs = zip(lists[2][row], lists[3][row])
                    best = sorted(pairs, key=lambda t: -t[1])[: seq.params.top_logprobs]
                    tok.top = [(int(i), float(lp)) for i, lp in best]
            out.append(tok)
        return out


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        make_cache: Callable[[], list],
        prefix_cache: PrefixCache | None = None,
        pipelined: bool | None = None,
    ):
        self.model = model
        self.make_cache = make_cache
        # Read step n's tokens after queuing step n+1 only where that overlaps anything: on a
        # GPU. On the CPU backend async_eval of a whole step returns only once most of it has
        # run (measured: a 100-op graph blocks ~all its compute), so reading a step late would
        # only delay every token by a step.
        self.pipelined = pipelined if pipelined is not None else mx.default_device() == mx.gpu
        self.prefix_cache = prefix_cache
        self.rows: list[str] = []  # sequence ids of the decode batch, in row order
        self.batch: list | None = None  # per-layer batch caches
        self.prefilling: dict[str, list] = {}  # per-layer caches of sequences still prefilling
        self.states: dict[str, RowState] = {}
        self.next_input: dict[str, tuple[mx.array, int]] = {}  # (sampled tokens, row) to feed next
        self.seqs: dict[str, Sequence] = {}
        self.masks = MaskFiller()

    # --- the step ---------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepResult:
        self._release(out.finished)
        result = StepResult()
        fresh = [s for s in out.scheduled if self._batchable(s)]
        if len(fresh) > 1:
            self._prefill_together(fresh)
        for sched in out.scheduled:
            if sched.seq.id not in self.next_input:
                self._prefill(sched, result)
        # Every row decodes, those that joined just now included: the last prompt token of a
        # finished prefill is decoded with the batch, which samples its first token this step.
        if self.batch is not None and any(s.samples for s in out.scheduled):
            self._decode(out.scheduled, result)
        pending = [a for _, res, _ in result.samples for a in res.arrays()]
        pending += [p.logprobs for p in result.prompt_scores]
        pending += [self.states[s.seq.id].key for s in out.scheduled if s.seq.id in self.states]
        if pending:
            mx.async_eval(pending)
        return result

    def _decode(self, scheduled: list[ScheduledSeq], result: StepResult) -> None:
        # The whole batch runs (a row can't sit a step out); rows not scheduled (their
        # max_tokens is reached, their finish not yet read) compute a token nobody reads.
        inputs = mx.concatenate([self._input_of(sid) for sid in self.rows])[:, None]
        logits = self.model(inputs, cache=self.batch)[:, -1, :]
        states = [self.states[sid] for sid in self.rows]
        grammars = [
            (i, g)
            for i, st in enumerate(states)
            if (g := st.params.grammar) is not None and g.active
        ]
        bitmask = None
        if grammars:
            # The masks fill on a worker thread while the forward pass computes.
            job = self.masks.start(grammars, logits.shape[-1])
            mx.async_eval(logits)
            bitmask = self._full_mask(self.masks.wait(job), job.rows, len(states))
        res = sample(logits, states, bitmask)
        wanted = {s.seq.id for s in scheduled if s.samples}
        for row, sid in enumerate(self.rows):
            self.next_input[sid] = (res.tokens, row)
            if sid in wanted:
                result.samples.append((self.seqs[sid], res, row))

    @staticmethod
    def _full_mask(masks: np.ndarray, rows: list[int], batch: int) -> mx.array:
        """The constrained rows' masks placed in a batch-wide mask (free rows all ones)."""
        full = np.full((batch, masks.shape[1]), -1, dtype=np.int32)
        full[rows] = masks
        return mx.array(full)

    @property
    def constrained(self) -> bool:
        """Some row decodes under a grammar: its next mask needs this step's token first."""
        return any(st.params.grammar is not None for st in self.states.values())

    def _input_of(self, sid: str) -> mx.array:
        tokens, row = self.next_input[sid]
        return tokens[row : row + 1]

    def _prefill(self, sched: ScheduledSeq, result: StepResult) -> None:
        # KV only, never logits: the lm_head over every prompt position would be the largest
        # matmul of a small model. The prompt's last token is left to the decode batch.
        seq = sched.seq
        caches = self.prefilling.get(seq.id) or self._start(sched)
        start, end = sched.start, min(sched.start + sched.num_tokens, seq.num_prompt - 1)
        if end > start:
            # Lazy: the logits are computed only when the prompt is scored.
            logits = self.model(mx.array([seq.prompt_ids[start:end]], dtype=mx.int32), cache=caches)
            if seq.params.prompt_logprobs:
                self._score_prompt(seq, start, logits[0], result)
        if sched.samples:
            self._join(seq, caches)
        else:
            self.prefilling[seq.id] = caches
            mx.async_eval([c.state[0] for c in caches if not c.empty()])

    def _batchable(self, sched: ScheduledSeq) -> bool:
        """A new prompt whose prefill ends this step (after any cached prefix), no scoring."""
        seq = sched.seq
        return (
            sched.start == sched.cached
            and sched.samples
            and not seq.params.prompt_logprobs
            and seq.id not in self.next_input
            and seq.id not in self.prefilling
        )

    def _prefill_together(self, group: list[ScheduledSeq]) -> None:
        # New prompts of one step prefill as one batch: BLAS and per-op costs are shared
        # (measured on CPU: 2.3 ms a token for 16 prompts against 3.3 ms one by one). Cached
        # prefixes are merged left-padded, the new tokens go right-padded and are rolled into
        # place (mlx-lm's prepare/finalize); the batch then joins the decode batch whole.
        if not all(type(c) is KVCache for c in self.make_cache()):
            return  # rotating (sliding-window) caches prefill one by one
        own = [self._start(s) for s in group]
        batch = [BatchKVCache.merge(list(layer)) for layer in zip(*own)]
        news = [s.seq.prompt_ids[s.start : s.seq.num_prompt - 1] for s in group]
        width = max(len(n) for n in news)
        if width:
            right = [width - len(n) for n in news]
            for c in batch:
                c.prepare(right_padding=right)
            tokens = [n + [0] * r for n, r in zip(news, right)]
            self.model(mx.array(tokens, dtype=mx.int32), cache=batch)  # KV only
            for c in batch:
                c.finalize()
        for i, sched in enumerate(group):
            seq = sched.seq
            if self.prefix_cache is not None and width:
                self.prefix_cache.insert(seq.prompt_ids[:-1], [c.extract(i) for c in batch])
            self.rows.append(seq.id)
            self.next_input[seq.id] = (mx.array(seq.prompt_ids[-1:], dtype=mx.int32), 0)
        if self.batch is None:
            self.batch = batch
        else:
            for b, m in zip(self.batch, batch):
                b.extend(m)

    def _start(self, sched: ScheduledSeq) -> list:
        """A sequence's own caches at its first step, holding KV up to `sched.start`."""
        seq = sched.seq
        self.seqs[seq.id] = seq
        self.states[seq.id] = RowState.create(seq.params, seq.prompt_ids)
        if sched.cached and self.prefix_cache is not None:
            restored = self.prefix_cache.restore(seq.prompt_ids, sched.cached)
            if restored is not None:
                return restored
        if sched.cached:  # the entry was evicted since admission: compute the prefix again
            seq.num_cached = seq.metrics.cached_tokens = 0
            caches = self.make_cache()
            if sched.start:
                self.model(mx.array([seq.prompt_ids[: sched.start]], dtype=mx.int32), cache=caches)
            return caches
        return self.make_cache()

    def _join(self, seq: Sequence, caches: list) -> None:
        """Move a prefilled sequence into the decode batch; its last prompt token goes next."""
        self.prefilling.pop(seq.id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.insert(seq.prompt_ids[:-1], caches)
        merged = [type(c).merge([c]) for c in caches]
        if self.batch is None:
            self.batch = merged
        else:
            for b, m in zip(self.batch, merged):
                b.extend(m)
        self.rows.append(seq.id)
        self.next_input[seq.id] = (mx.array(seq.prompt_ids[-1:], dtype=mx.int32), 0)

    def _score_prompt(
        self, seq: Sequence, start: int, logits: mx.array, result: StepResult
    ) -> None:
        # Position i predicts token i+1; the chunk's last position may predict past the prompt.
        targets = seq.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        if not targets:
            return
        lp = logits[: len(targets)].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)[:, 0]
        scores = PromptScores(seq, targets, chosen)
        k = seq.params.top_logprobs
        if k:
            scores.top_ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
            scores.top_logprobs = mx.take_along_axis(lp, scores.top_ids, axis=-1)
        result.prompt_scores.append(scores)

    # --- leaving ----------------------------------------------------------------------------
    def _release(self, finished: list[Sequence]) -> None:
        gone = {s.id for s in finished}
        if not gone:
            return
        for seq in finished:
            self.prefilling.pop(seq.id, None)
            self.states.pop(seq.id, None)
            self.next_input.pop(seq.id, None)
            self.seqs.pop(seq.id, None)
        keep = [i for i, sid in enumerate(self.rows) if sid not in gone]
        if len(keep) == len(self.rows):
            return
        if self.prefix_cache is not None and self.batch is not None:
            self._keep_prefixes([s for s in finished if s.id in self.rows])
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.batch = None
            return
        idx = mx.array(keep, dtype=mx.int32)
        for c in self.batch or []:
            c.filter(idx)

    def _keep_prefixes(self, finished: list[Sequence]) -> None:
        # A finished conversation's KV serves its next turn (multi-turn chats resend it all).
        assert self.prefix_cache is not None and self.batch is not None
        for seq in finished:
            row = self.rows.index(seq.id)
            if not all(hasattr(c, "extract") for c in self.batch):
                return
            caches = [c.extract(row) for c in self.batch]
            tokens = seq.all_token_ids()
            n = min(len(tokens), min(c.offset for c in caches))
            self.prefix_cache.insert(tokens[:n], caches)

    @property
    def num_active(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def kv_bytes(self) -> int:
        total = sum(c.nbytes for c in self.batch) if self.batch else 0
        for caches in self.prefilling.values():
            total += sum(c.nbytes for c in caches)
        return total


def token_logprob(tok: SampledToken, text_of: Callable[[int], str]) -> TokenLogprob | None:
    if tok.logprob is None:
        return None
    return TokenLogprob(
        tok.token, text_of(tok.token), tok.logprob, [(i, text_of(i), lp) for i, lp in tok.top]
    )
