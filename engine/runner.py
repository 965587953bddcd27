"""Executes the scheduler's decisions over an MLX model: the engine's MLX side.

A function of its input (a SchedulerOutput) and its own batch state: the decode batch's
per-layer caches (mlx-lm's BatchKVCache / BatchRotatingKVCache, left-padded; `extend` to join,
`filter` to leave), the caches of sequences still prefilling, each row's sampling state and the
lazily sampled token each row feeds next. It keeps no copy of the scheduler's bookkeeping.

A sequence prefills in chunks (new prompts of one step together) up to its last known token,
then joins the batch, whose decode of that token samples its next one. `submit` queues a step
(`mx.async_eval`) and returns it pending; `execute` also reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine import prefill_plan
from engine.grammar import MaskFiller
from engine.kv_memory import fit_to_prompt, keep_rows, settle
from engine.outputs import RunnerOutput, ScheduledSeq, SchedulerOutput, row_failure
from engine.pending import PendingStep, PromptScores, RowSample, sample_rows
from engine.prefix_cache import PrefixCache
from engine.sampling import RowState
from engine.sequence import Sequence
from engine.speculative import (
    BatchKVCache,
    Verified,
    draft_inputs,
    merge,
    sync_history,
    trimmable,
    verify_rows,
)
from models import qkernels
from models.fused_layers import verifies_cheaply

log = logging.getLogger("mlxd.engine")


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
        # Pipelined (the GPU's default): step n+1 is built before step n is read. On the CPU
        # it would be started only after step n is read (MLX's CPU async_eval blocks until all
        # but ~10 tasks are queued), and building it beside the two kernel threads on 2 cores
        # made sampled streams 1.06-1.2x slower than read-now steps (bench A/Bs, 2026-11-30).
        self.pipelined = pipelined if pipelined is not None else mx.default_device() == mx.gpu
        self.deferred = self.pipelined and mx.default_device() == mx.cpu
        self.prefix_cache = prefix_cache
        self.rows: list[str] = []  # sequence ids of the decode batch, in row order
        self.batch: list | None = None  # per-layer batch caches
        self.prefilling: dict[str, list] = {}  # per-layer caches of sequences still prefilling
        self.states: dict[str, RowState] = {}
        self.next_input: dict[str, tuple[mx.array, int]] = {}  # (sampled tokens, row) to feed next
        self.masks = MaskFiller()
        # Fresh caches are plain KV caches: new prompts prefill together, rows can verify drafts.
        self.trimmable = trimmable(make_cache())
        # Whether verifying drafts is cheap: on a GPU a decode step reads the weights once for
        # every position; on the CPU when attention runs them on mlxd's kernel (SmolLM2 Q4_1,
        # 2 cores, fused stack: 4 drafts add ~1 step to a one-token step's ~9 ms; on MLX's SDPA
        # each added nearly a whole step).
        # `speculative = "auto"` leaves speculation off elsewhere.
        self.cheap_positions = mx.default_device() == mx.gpu or verifies_cheaply(model)
        # A verify pass computes each position as a decode step would only while mlxd's CPU
        # kernels take its rows: from BLAS_ROWS rows on, matmuls go to the BLAS (other sums).
        on_kernels = mx.default_device() == mx.cpu and qkernels.available()
        self.exact_positions = qkernels.BLAS_ROWS - 1 if on_kernels else 0
        self._verified: Verified | None = None  # the last pass's drafts, cut from the KV next
        self._stale: set[str] = set()  # penalized rows whose history lacks accepted drafts
        # A step's new prompts prefill together in batches whose padded transient arrays,
        # prefill_bytes(rows, width, keys), fit prefill_budget() (None: all in one batch).
        self.prefill_bytes: Callable[[int, int, int], int] | None = None
        self.prefill_budget: Callable[[], int] = lambda: 0
        # kv_bytes() as of the caches' last change, for /metrics on its own thread: kept
        # current within a step too, as a long step's prefills add KV one batch at a time.
        self.kv_in_use = 0
        self._rewritten = False  # the batch's caches were copied lazily (kv_memory.settle)

    # --- the step ---------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.submit(out).result()

    def submit(self, out: SchedulerOutput) -> PendingStep:
        """Queue one step. A row's own failure lands in `failed`; a failure of the shared
        decode pass raises (the caller fails the batch's rows and calls `reset`)."""
        self._trim_rejected()
        kept = self._release(out.finished, out.preempted)
        step = PendingStep()
        scheduled = [s for s in out.scheduled if self._has_state(s.seq, step)]
        # New sequences take their cached prefixes before anything is inserted this step, so
        # an entry matched at admission can't be evicted before it is used.
        for sched in scheduled:
            if self._is_new(sched.seq.id):
                self._start(sched, step)
        scheduled = [s for s in scheduled if s.seq.id not in step.failed]
        self._count_kv()
        if self.prefix_cache is not None:
            for tokens, caches in kept:
                self.prefix_cache.insert(tokens, caches)
        fresh = [s for s in scheduled if self._batchable(s)]
        for batch in self._prefill_batches(fresh):
            if len(batch) > 1:
                self._prefill_together(batch)
                self._count_kv()
        for sched in scheduled:
            if sched.seq.id not in self.next_input:
                self._prefill(sched, step)
                self._count_kv()
        # Every row decodes, those that joined just now included: the last prompt token of a
        # finished prefill is decoded with the batch, which samples its first token this step.
        if self.batch is not None and any(s.samples for s in scheduled):
            self._decode(scheduled, step)
            self._count_kv()
        step.queued = step.arrays()
        step.queued += [self.states[s.seq.id].key for s in scheduled if s.seq.id in self.states]
        if not self.deferred:
            step.start()
        return step

    def _decode(self, scheduled: list[ScheduledSeq], step: PendingStep) -> None:
        # The whole batch runs (a row can't sit a step out); rows not scheduled (their
        # max_tokens is reached, their finish not yet read) compute a token nobody reads.
        drafts = {s.seq.id: s.draft for s in scheduled if s.draft}
        self._stale = sync_history(scheduled, self.states, self._stale)
        next_tokens = [self._input_of(sid) for sid in self.rows]
        if drafts:
            row_drafts = [drafts.get(sid, []) for sid in self.rows]
            inputs = draft_inputs(next_tokens, row_drafts)
        else:
            inputs = mx.concatenate(next_tokens)[:, None]
        if self._rewritten:  # rows joined or left: one layer's copy at a time
            settle(self.batch or [])
            self._rewritten = False
        all_logits = self.model(inputs, cache=self.batch)
        logits = all_logits[:, 0, :]
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
        res, failed = sample_rows(logits, states, self.rows, bitmask)
        following = res.tokens
        if drafts:
            self._verified = verify_rows(all_logits, inputs, res.tokens, row_drafts, states, failed)
            following = self._verified.next
        wanted = {s.seq.id: s.seq for s in scheduled if s.samples}
        for row, sid in enumerate(self.rows):
            self.next_input[sid] = (following, row)
            if row in failed:
                step.failed[sid] = failed[row]
            elif sid in wanted:
                verified = self._verified if sid in drafts else None
                step.samples.append(RowSample(sid, wanted[sid].params, res, row, verified))

    def _trim_rejected(self) -> None:
        """Cut what the last pass computed past each row's accepted tokens (drafts that did not
        hold, filler). The rows are still those of that pass: rows leave after this."""
        if self._verified is None:
            return
        rejected, self._verified = self._verified.rejected(), None
        for c in self.batch or []:
            c.trim_rows(rejected)
        # Only rows trimmed by different counts are shifted (a copy a layer); one count moves the end.
        self._rewritten = self._rewritten or len(set(rejected)) > 1

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

    def _is_new(self, sid: str) -> bool:
        return sid not in self.next_input and sid not in self.prefilling

    def _has_state(self, seq: Sequence, step: PendingStep) -> bool:
        """A row's sampling state exists (made at its first step); False if making it failed."""
        if seq.id in self.states:
            return True
        try:
            self.states[seq.id] = RowState.create(seq.params, seq.prompt_ids)
        except Exception as e:  # e.g. a seed outside the key space: this request's fault alone
            log.exception("sampling setup failed for request %s", seq.id)
            step.failed[seq.id] = row_failure(e, setup=True)
            return False
        return True

    def _start(self, sched: ScheduledSeq, step: PendingStep) -> None:
        """A new sequence's own caches, holding KV up to `sched.start` (its cached prefix)."""
        seq = sched.seq
        try:
            caches = None
            if sched.cached and self.prefix_cache is not None:
                caches = self.prefix_cache.restore(seq.prefill_ids, sched.cached)
            if caches is None:
                caches = fit_to_prompt(self.make_cache())
                if sched.start:  # an entry gone since admission: compute the prefix again
                    seq.num_cached = seq.metrics.cached_tokens = 0
                    prefix = mx.array([seq.prefill_ids[: sched.start]], dtype=mx.int32)
                    self.model(prefix, cache=caches)
        except Exception as e:
            log.exception("prefill failed for request %s", seq.id)
            self._forget(seq.id)
            step.failed[seq.id] = row_failure(e)
            return
        self.prefilling[seq.id] = fit_to_prompt(caches)  # restored ones too

    def _prefill(self, sched: ScheduledSeq, step: PendingStep) -> None:
        # KV only, never logits: the lm_head over every prompt position would be the largest
        # matmul of a small model. The last known token is left to the decode batch.
        seq = sched.seq
        caches = self.prefilling[seq.id]
        start, end = sched.start, min(sched.start + sched.num_tokens, seq.num_prefill - 1)
        try:
            pieces = self._prefill_pieces(start, end) if end > start else []
            for a, b in pieces:
                # Lazy: the logits are computed only when the prompt is scored.
                logits = self.model(mx.array([seq.prefill_ids[a:b]], dtype=mx.int32), cache=caches)
                if self._scores(seq):
                    self._score_prompt(seq, a, logits[0], step)
                if b < end:  # computed now (KV counted first): pieces never hold their
                    self._count_kv()  # transients at once
                    mx.async_eval([c.state[0] for c in caches if not c.empty()])
            self._count_kv()  # the last piece's KV, computed as it joins (or next)
        except Exception as e:  # this sequence's own caches: the batch is untouched
            log.exception("prefill failed for request %s", seq.id)
            self._forget(seq.id)
            step.failed[seq.id] = row_failure(e)
            return
        if sched.samples:
            self._join(seq, caches)
        else:
            mx.async_eval([c.state[0] for c in caches if not c.empty()])

    @staticmethod
    def _scores(seq: Sequence) -> bool:
        """The prompt is scored on its first prefill only (not when recomputed later)."""
        return seq.params.prompt_logprobs and not seq.output_ids

    def _batchable(self, sched: ScheduledSeq) -> bool:
        """A new sequence whose prefill ends this step (after any cached prefix), no scoring."""
        return (
            sched.start == sched.cached
            and sched.samples
            and not self._scores(sched.seq)
            and sched.seq.id in self.prefilling
        )

    def _prefill_batches(self, fresh: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
        """New prompts in batches within the prefill budget (engine/prefill_plan.py)."""
        if self.prefill_bytes is None or len(fresh) < 2:
            return [fresh]
        return prefill_plan.batches(fresh, self.prefill_bytes, self.prefill_budget())

    def _prefill_pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """One prompt's chunk in pieces within the prefill budget (engine/prefill_plan.py)."""
        if self.prefill_bytes is None:
            return [(start, end)]
        return prefill_plan.pieces(start, end, self.prefill_bytes, self.prefill_budget())

    def _prefill_together(self, group: list[ScheduledSeq]) -> None:
        """New sequences of one step prefill as one batch (KV only) and join the decode batch.

        BLAS and per-op costs are shared (measured on CPU: 2.3 ms a token for 16 prompts
        against 3.3 ms one by one). Cached prefixes are merged left-padded, the new tokens go
        right-padded and are rolled into place (mlx-lm's prepare/finalize). If this fails, the
        group prefills one by one, each failing alone."""
        if not self.trimmable:
            return  # rotating (sliding-window) caches prefill one by one
        try:
            own = [self.prefilling[s.seq.id] for s in group]
            batch = [BatchKVCache.merge(list(layer)) for layer in zip(*own)]
            news = [s.seq.prefill_ids[s.start : s.seq.num_prefill - 1] for s in group]
            width = max(len(n) for n in news)
            if width:
                right = [width - len(n) for n in news]
                for c in batch:
                    c.prepare(right_padding=right)
                tokens = [n + [0] * r for n, r in zip(news, right)]
                self.model(mx.array(tokens, dtype=mx.int32), cache=batch)  # KV only
                for c in batch:
                    c.finalize()
                # Computed now, so batches of one step never hold their transients at once
                # (on the CPU this returns once they are: count their KV before).
                self.kv_in_use = self.kv_bytes() + sum(c.nbytes for c in batch)
                mx.async_eval([a for c in batch for a in (c.keys, c.values)])
        except Exception:  # new sequences only, the decode batch is untouched
            log.warning("batched prefill failed; prefilling one by one", exc_info=True)
            return
        for i, sched in enumerate(group):
            seq = sched.seq
            if self.prefix_cache is not None and width:
                self.prefix_cache.insert(seq.prefill_ids[:-1], [c.extract(i) for c in batch])
            self.prefilling.pop(seq.id)
            self._add_row(seq)
        self._extend(batch)

    def _join(self, seq: Sequence, caches: list) -> None:
        """Move a prefilled sequence into the decode batch; its last known token goes next."""
        self.prefilling.pop(seq.id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.insert(seq.prefill_ids[:-1], caches)
        self._extend([merge([c]) for c in caches])
        self._add_row(seq)

    def _add_row(self, seq: Sequence) -> None:
        self.rows.append(seq.id)
        self.next_input[seq.id] = (mx.array(seq.prefill_ids[-1:], dtype=mx.int32), 0)

    def _extend(self, batch: list) -> None:
        if self.batch is None:
            self.batch = batch
        else:
            for b, m in zip(self.batch, batch):
                b.extend(m)
        self._rewritten = True  # a copy of the joining rows' own caches, or of the whole batch

    def _score_prompt(self, seq: Sequence, start: int, logits: mx.array, step: PendingStep) -> None:
        # Position i predicts token i+1; the chunk's last position may predict past the prompt.
        targets = seq.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        if not targets:
            return
        lp = logits[: len(targets)].astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)[:, 0]
        scores = PromptScores(seq.id, targets, chosen)
        k = seq.params.top_logprobs
        if k:
            scores.top_ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
            scores.top_logprobs = mx.take_along_axis(lp, scores.top_ids, axis=-1)
        step.prompt_scores.append(scores)

    # --- leaving ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every row and cache (after a failed shared pass left them in an unknown state)."""
        self.rows, self.batch, self._verified, self._rewritten = [], None, None, False
        self.prefilling, self.states, self.next_input = {}, {}, {}
        self.kv_in_use = 0

    def _forget(self, sid: str) -> None:
        self.prefilling.pop(sid, None)
        self.states.pop(sid, None)
        self.next_input.pop(sid, None)

    def _release(
        self, finished: list[Sequence], preempted: list[Sequence]
    ) -> list[tuple[list[int], list]]:
        """Finished and preempted rows leave the batch; returns the KV worth keeping as
        prefixes (a finished conversation's KV serves its next turn: multi-turn chats resend
        it all; a preempted sequence's serves its return)."""
        for seq in finished:
            self._forget(seq.id)
        for seq in preempted:  # its sampling state stays: it goes on where it stopped
            self.prefilling.pop(seq.id, None)
            self.next_input.pop(seq.id, None)
        gone = {s.id for s in [*finished, *preempted]}
        leaving = [s for s in [*finished, *preempted] if s.id in self.rows]
        if not leaving:
            return []
        assert self.batch is not None
        kept = []
        if self.prefix_cache is not None and all(hasattr(c, "extract") for c in self.batch):
            for seq in leaving:
                caches = [c.extract(self.rows.index(seq.id)) for c in self.batch]
                tokens = seq.all_token_ids()
                kept.append((tokens[: min(len(tokens), min(c.offset for c in caches))], caches))
            # Copied now (a row's KV), so the batch's old arrays go when it is settled below.
            mx.async_eval([a for _, caches in kept for c in caches for a in (c.keys, c.values)])
        keep = [i for i, sid in enumerate(self.rows) if sid not in gone]
        self.rows = [self.rows[i] for i in keep]
        self.batch = keep_rows(self.batch, keep)
        return kept

    @property
    def num_active(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def kv_bytes(self) -> int:
        """Bytes of the KV arrays held: the batch's whole capacity (padding, room to grow) and
        the prefilling sequences' caches. Sizes are known before the arrays are computed."""
        total = sum(c.nbytes for c in self.batch) if self.batch else 0
        for caches in self.prefilling.values():
            total += sum(c.nbytes for c in caches)
        return total

    def _count_kv(self) -> None:
        self.kv_in_use = self.kv_bytes()
