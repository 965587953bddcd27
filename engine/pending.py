"""A step's sampling and its lazy outcome: what the runner queued, read back in one place.

`sample_rows` samples a batch so that a row whose own sampler raises fails alone; `PendingStep`
holds the step's lazy arrays until `result()`, the step's only sync point, turns them into a
plain RunnerOutput.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from engine.outputs import Failure, RunnerOutput, Sampled, row_failure
from engine.sampling import RowState, SampleResult, sample
from engine.speculative import Verified
from engine.types import SamplingParams

log = logging.getLogger("mlxd.engine")


def sample_rows(
    logits: mx.array, rows: list[RowState], ids: list[str], bitmask: mx.array | None = None
) -> tuple[SampleResult, dict[int, Failure]]:
    """Sample every row of `logits` [B, V] (under grammar `bitmask`, sampling.sample's); returns
    the rows whose own sampler raised. Those get a greedy stand-in token nobody reads; the
    others draw exactly what they would have."""
    saved = [(r.key, len(r.history)) for r in rows]
    try:
        return sample(logits, rows, bitmask), {}
    except Exception:
        _restore(rows, saved)
    failed: dict[int, Failure] = {}
    for i, r in enumerate(rows):  # which row? each alone (lazy graphs: nothing is computed)
        try:
            sample(logits[i : i + 1], [r], None if bitmask is None else bitmask[i : i + 1])
        except Exception as e:
            log.exception("sampling failed for request %s", ids[i])
            failed[i] = row_failure(e)
        _restore([r], [saved[i]])
    stand_in = RowState.create(SamplingParams(temperature=0.0, seed=0), [])
    rest = [stand_in if i in failed else r for i, r in enumerate(rows)]
    res = sample(logits, rest, bitmask)
    return res, failed


def _restore(rows: list[RowState], saved: list[tuple[mx.array, int]]) -> None:
    """Undo what a failed sample() call advanced: each row's key and history."""
    for r, (key, n) in zip(rows, saved):
        r.key = key
        del r.history[n:]


@dataclass
class PromptScores:
    """Log-probabilities of prompt tokens start+1 .. start+n under a prefill chunk (lazy)."""

    seq_id: str
    token_ids: list[int]
    logprobs: mx.array  # [n]
    top_ids: mx.array | None = None  # [n, K]
    top_logprobs: mx.array | None = None

    def read(self) -> list[Sampled]:
        lps: list[Any] = self.logprobs.tolist()  # type: ignore[assignment]
        tops: tuple[Any, Any] | None = None
        if self.top_ids is not None and self.top_logprobs is not None:
            tops = (self.top_ids.tolist(), self.top_logprobs.tolist())
        out = []
        for i, (tid, lp) in enumerate(zip(self.token_ids, lps)):
            top = []
            if tops is not None:
                top = sorted(zip(tops[0][i], tops[1][i]), key=lambda t: -t[1])
            out.append(Sampled(tid, lp, [(int(a), float(b)) for a, b in top]))
        return out


@dataclass
class RowSample:
    """Which row of which sample is a sequence's token, and what it asked to see of it."""

    seq_id: str
    params: SamplingParams
    res: SampleResult
    row: int
    # Drafts were checked: the row's tokens are its accepted drafts and the token after them.
    verified: Verified | None = None

    def arrays(self) -> list[mx.array]:
        return self.res.arrays() + (self.verified.arrays() if self.verified else [])


@dataclass
class PendingStep:
    """The lazy outcome of one queued step."""

    samples: list[RowSample] = field(default_factory=list)
    prompt_scores: list[PromptScores] = field(default_factory=list)
    failed: dict[str, Failure] = field(default_factory=dict)
    queued: list[mx.array] = field(default_factory=list)  # built, not yet started (`start`)

    def start(self) -> None:
        """Start computing the step (`mx.async_eval`) if its submit left that to the caller."""
        if self.queued:
            queued, self.queued = self.queued, []
            mx.async_eval(queued)

    def arrays(self) -> list[mx.array]:
        return [a for s in self.samples for a in s.arrays()] + [
            p.logprobs for p in self.prompt_scores
        ]

    def result(self) -> RunnerOutput:
        """Block until the step's tokens exist and return them (the step's only sync point)."""
        self.start()
        out = RunnerOutput(failed=dict(self.failed))
        for scores in self.prompt_scores:
            out.prompt_scores.setdefault(scores.seq_id, []).extend(scores.read())
        lists: dict[int, list[Any]] = {}
        for s in self.samples:
            if s.verified is not None:
                tokens = self._verified(s.verified, lists)[s.row]
                out.tokens[s.seq_id] = [Sampled(t) for t in tokens]
                continue
            got = lists.get(id(s.res))
            if got is None:
                got = lists[id(s.res)] = [a.tolist() for a in s.res.arrays()]
            tok = Sampled(got[0][s.row])
            if s.res.logprobs is not None and s.params.logprobs:
                tok.logprob = got[1][s.row]
                if s.res.top_ids is not None and s.params.top_logprobs:
                    best = sorted(zip(got[2][s.row], got[3][s.row]), key=lambda t: -t[1])
                    tok.top = [(int(i), float(lp)) for i, lp in best[: s.params.top_logprobs]]
            out.tokens.setdefault(s.seq_id, []).append(tok)
        return out

    @staticmethod
    def _verified(v: Verified, lists: dict[int, list[Any]]) -> list[list[int]]:
        """Each row's accepted tokens and the one after them (read once per pass)."""
        got = lists.get(id(v))
        if got is None:
            tokens, accepted = v.tokens.tolist(), v.accepted.tolist()
            got = lists[id(v)] = [t[: a + 1] for t, a in zip(tokens, accepted)]  # type: ignore
        return got
