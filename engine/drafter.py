"""Prompt-lookup (n-gram) drafting: guesses of a row's next tokens, taken from its own prompt and
output (no draft model). No MLX: the scheduler drafts, the runner verifies.

For each sequence an index maps every n-gram seen (n = MAX_NGRAM down to MIN_NGRAM) to where its
most recent occurrence continued; the draft is what followed the longest n-gram ending the text.
The index grows with the text (O(new tokens) a step, not a scan of the context). A rejected
draft costs compute (every drafted position is computed), so a draft's length follows how much
evidence backs it: a 4-gram match drafts up to k tokens, a 3-gram k / 2, a 2-gram one; and a
per-row trust, halved by a draft that missed entirely and doubled by one that held, caps it.
Each row's estimated chance that a drafted token holds tells the step how many of its drafts
will likely hold: greedy copies hold ~0.9 a token, sampled rows less the hotter they sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.types import SamplingParams

# A 1-token match guesses wrong too often to pay for the positions it adds; longer matches first.
MAX_NGRAM = 4
MIN_NGRAM = 2
# speculative = "auto" drafts while at most this many sequences run: past that, the positions a
# draft adds to every row of the batch cost more than its accepted tokens save.
AUTO_MAX_ROWS = 4
# A draft's tokens hold one after another until the first miss: a row whose drafted tokens each
# hold with probability a accepts a + a^2 + ... + a^m of a draft of m. Each row estimates a as
# held / (held + first misses) over its verified drafts backed by as long an n-gram (a copy's
# 4-gram drafts hold where its 2-gram ones miss), old ones fading (EVIDENCE_DECAY a draft), from PRIOR_WEIGHT pseudo-drafts at its kind's rate (greedy or sampled rows, learned
# over all rows at LEARN_WEIGHT a draft; chat holds ~0.65 a token greedy, ~0.3 at T=0.7). A
# row's drafts not worth verifying fade its evidence (SKIP_DECAY a step) and nudge its kind's
# rate toward RETRY_RATE, so drafting resumes after a while where nothing held for long.
PRIOR_RATE = {True: 0.65, False: 0.5}
EVIDENCE_DECAY = 0.75
PRIOR_WEIGHT = 2.0
LEARN_WEIGHT = 0.05
SKIP_DECAY = 0.9
RETRY_RATE = 0.75
RETRY_STEPS = 256
# A pass's cost in units of c, one row-position's: a one-position step of B rows costs
# STEP_BASE + B, and a verify pass of width W (1 + W positions a row) B * W more: the fused
# stack runs it as one op (models/fused_stack.py), with no fixed cost of its own. Measured on
# the CPU kernels (SmolLM2 Q4_1, 1/2/4 left-padded rows at ~300 positions, 1 + W = 1..9, the
# server's two threads, wall clock, in-process interleaved medians, load ~2, 2026-11-30): 9.1 /
# 11.7 / 14.3 / 16.8 / 18.5 / 20.6 / 24.2 / 25.5 / 29.8 ms for one row; a least-squares fit over
# all gives c ~ 2.5-2.7 ms, STEP_BASE ~ 2.2-2.7 and no fixed verify cost (-0.1 to 0). On one
# thread (CPU time) c ~ 3.7-4.1 ms, STEP_BASE ~ 1.7.
STEP_BASE = 2.5
# A step drafts only where the cost model promises this much more speed than not drafting: the
# constants are wall-clock fits on an idle machine, and on a busy one an extra position costs
# more (the one-thread fit above). A sampled chat's ~0.3 a token, at break-even by the fit,
# measured 0.92-1.19x of not drafting (make bench-spec, load 1.5-6): it no longer drafts.
MIN_GAIN = 0.05


def speculates(mode: str, running: int) -> bool:
    """Whether rows may draft this step: `mode` is the `speculative` setting."""
    return mode == "on" or (mode == "auto" and running <= AUTO_MAX_ROWS)


def fit_width(
    drafts: list[int], rows: int, positions: int = 0, rates: list[float] | None = None
) -> int:
    """The draft width a step verifies (0: none), given each drafting row's draft length, the
    chance each of its drafted tokens holds (`rates`; a greedy row's prior if not given) and
    the rows of the decode batch. Every row computes as many positions as the widest draft
    (filler where it drafted less). The width that yields most tokens per unit of time wins,
    the narrowest on a tie: B rows yield B + their expected accepted drafts in STEP_BASE + B
    + B * W, if that beats not drafting by MIN_GAIN. A row alone drafts from a = 0.35 a token
    (2 tokens from 0.6, 4 from 0.83, all 8 from 0.95), 2 rows both drafting from 0.52, 4 rows
    from 0.7. `positions` (0: none) caps B (1 + W), the runner's bound for exact verification."""
    top = max(drafts, default=0)
    if positions:
        top = max(0, min(top, positions // max(1, rows) - 1))
    rates = rates or [PRIOR_RATE[True]] * len(drafts)

    def tokens_per_cost(width: int) -> float:
        accepted = sum(expected(r, min(d, width)) for d, r in zip(drafts, rates))
        cost = STEP_BASE + rows * (1 + width)
        return (rows + accepted) / cost

    best = max(range(top + 1), key=lambda w: (tokens_per_cost(w), -w))
    return best if tokens_per_cost(best) >= (1 + MIN_GAIN) * tokens_per_cost(0) else 0


def expected(rate: float, drafted: int) -> float:
    """Drafts expected to hold of `drafted`, each holding with `rate` once those before did."""
    return sum(rate**j for j in range(1, drafted + 1))


def can_draft(p: SamplingParams) -> bool:
    """Rows whose verification is exact: greedy or sampled (temperature, top_k, top_p, min_p
    and logit bias apply alike at every position; repetition, presence and frequency penalties
    over the history plus the drafts before it). Not rows under a grammar (its mask at a
    position needs the matcher advanced by the drafts before), with logits processors (hooks
    that may keep state) or reporting logprobs per token."""
    return (
        p.grammar is None
        and not p.logits_processors
        and not p.logprobs
        and not p.prompt_logprobs
        and p.max_tokens > 0
    )


@dataclass
class _Index:
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> continuation
    indexed: int = 0  # n-grams ending before this position are in `ngrams`
    trust: int = 1  # the longest draft this row makes now
    greedy: bool = True
    order: int = MAX_NGRAM  # the n-gram length backing the row's latest draft
    # By n-gram length: drafted tokens that held and drafts that missed somewhere, old ones fading.
    held: dict[int, float] = field(default_factory=dict)
    missed: dict[int, float] = field(default_factory=dict)


class NgramDrafter:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens  # k: the most tokens one row drafts in a step
        self._rows: dict[str, _Index] = {}
        # How drafted tokens of greedy rows and of sampled rows held lately, over all rows.
        self.learned = dict(PRIOR_RATE)

    def propose(self, seq_id: str, tokens: list[int], limit: int, greedy: bool = True) -> list[int]:
        """Up to min(limit, the row's draft length) tokens likely to follow `tokens`."""
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = _Index(trust=self.max_tokens, greedy=greedy)
        self._index(row, tokens)
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            start = row.ngrams.get(tuple(tokens[-n:]))
            if start is not None:
                row.order = n
                backed = self.max_tokens >> (MAX_NGRAM - n) if n > MIN_NGRAM else 1
                return tokens[start : start + max(0, min(limit, row.trust, max(1, backed)))]
        return []

    def observe(self, seq_id: str, drafted: int, accepted: int) -> None:
        """How a row's draft fared: trust doubles after a full accept, grows to one more than
        held after a partial one, and halves after a total miss."""
        row = self._rows.get(seq_id)
        if row is None or drafted <= 0:
            return
        missed, n = float(accepted < drafted), row.order
        row.held[n] = EVIDENCE_DECAY * row.held.get(n, 0.0) + accepted
        row.missed[n] = EVIDENCE_DECAY * row.missed.get(n, 0.0) + missed
        kind = self.learned[row.greedy]
        self.learned[row.greedy] = kind + LEARN_WEIGHT * (accepted / (accepted + missed) - kind)
        if accepted >= drafted:
            row.trust = min(self.max_tokens, 2 * row.trust)
        elif accepted > 0:
            row.trust = min(self.max_tokens, max(row.trust, accepted + 1))
        else:
            row.trust = max(1, row.trust // 2)

    def rate(self, seq_id: str, greedy: bool = True) -> float:
        """The chance each token of this row's latest draft holds."""
        row = self._rows.get(seq_id)
        if row is None:
            return self.learned[greedy]
        prior = self.learned[row.greedy]
        held, missed = row.held.get(row.order, 0.0), row.missed.get(row.order, 0.0)
        return (held + PRIOR_WEIGHT * prior) / (held + missed + PRIOR_WEIGHT)

    def skipped(self, seq_id: str) -> None:
        """A row's draft was not verified (not worth its width): its evidence fades toward its
        kind's rate, which drifts toward RETRY_RATE, so drafting resumes after a while."""
        row = self._rows.get(seq_id)
        if row is not None:
            n = row.order
            row.held[n] = SKIP_DECAY * row.held.get(n, 0.0)
            row.missed[n] = SKIP_DECAY * row.missed.get(n, 0.0)
            kind = self.learned[row.greedy]
            self.learned[row.greedy] = kind + (RETRY_RATE - kind) / RETRY_STEPS

    def forget(self, seq_id: str) -> None:
        self._rows.pop(seq_id, None)

    @staticmethod
    def _index(row: _Index, tokens: list[int]) -> None:
        # An n-gram ending at position p continues at p + 1; it is indexed once that exists,
        # so the n-gram ending the text finds an earlier occurrence, never itself.
        end = len(tokens) - 1
        for p in range(row.indexed, end):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if p + 1 >= n:
                    row.ngrams[tuple(tokens[p + 1 - n : p + 1])] = p + 1
        row.indexed = max(row.indexed, end)
