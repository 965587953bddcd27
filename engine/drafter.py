"""Prompt-lookup (n-gram) drafting: guesses of a row's next tokens, taken from its own prompt and
output (no draft model). No MLX: the scheduler drafts, the runner verifies.

For each sequence an index maps every n-gram seen (n = MAX_NGRAM down to MIN_NGRAM) to where its
most recent occurrence continued; the draft is what followed the longest n-gram ending the text.
The index grows with the text (O(new tokens) a step, not a scan of the context). A rejected
draft costs compute (every drafted position is computed), so a draft's length follows how much
evidence backs it: a 4-gram match drafts up to k tokens, a 3-gram k / 2, a 2-gram one; and a
per-row trust, halved by a draft that missed entirely and doubled by one that held, caps it.
Each row's share of drafts accepted (a moving average) tells the step how many of its drafts
will likely hold: greedy copies hold ~90%, sampled rows fewer the hotter they sample.
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
# A new row's expected share of drafts accepted, and how fast observed drafts move it.
PRIOR_RATE = 0.5
RATE_WEIGHT = 0.25


def speculates(mode: str, running: int) -> bool:
    """Whether rows may draft this step: `mode` is the `speculative` setting."""
    return mode == "on" or (mode == "auto" and running <= AUTO_MAX_ROWS)


def fit_width(
    drafts: list[int], rows: int, positions: int = 0, rates: list[float] | None = None
) -> int:
    """The widest draft a step verifies, given each drafting row's draft length (and share of
    drafts it has seen accepted, `rates`, PRIOR_RATE if not given) and the rows of the decode
    batch. Every row computes as many positions as the widest draft (filler where it drafted
    less). A step of B rows costs base + c * positions and yields B tokens plus the accepted
    drafts A; widening it by W pays while A > B^2 c W / (base + c B). With c ~ base / 3 (the
    CPU kernels, SmolLM2: a fused one-position step against the positions of a verify pass),
    the expected accepted drafts must reach B^2 / (B + 3) times the width. At half accepted
    (chat; copying a text holds ~90%): a row drafting alone pays, among 2 rows both must
    draft, among 3 all, among 4 never; a row alone stops drafting below a quarter accepted.
    `positions` (0: none) caps B (1 + W), the runner's bound for exact verification."""
    width = max(drafts, default=0)
    if positions:
        width = max(0, min(width, positions // max(1, rows) - 1))
    rates = rates or [PRIOR_RATE] * len(drafts)
    need = rows * rows / (rows + 3)
    while width and sum(r * min(d, width) for d, r in zip(drafts, rates)) < need * width:
        width -= 1
    return width


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
    rate: float = PRIOR_RATE  # moving average of the share of its drafts accepted


class NgramDrafter:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens  # k: the most tokens one row drafts in a step
        self._rows: dict[str, _Index] = {}

    def propose(self, seq_id: str, tokens: list[int], limit: int) -> list[int]:
        """Up to min(limit, the row's draft length) tokens likely to follow `tokens`."""
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = _Index(trust=self.max_tokens)
        self._index(row, tokens)
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            start = row.ngrams.get(tuple(tokens[-n:]))
            if start is not None:
                backed = self.max_tokens >> (MAX_NGRAM - n) if n > MIN_NGRAM else 1
                return tokens[start : start + max(0, min(limit, row.trust, max(1, backed)))]
        return []

    def observe(self, seq_id: str, drafted: int, accepted: int) -> None:
        """How a row's draft fared: trust doubles after a full accept, grows to one more than
        held after a partial one, and halves after a total miss."""
        row = self._rows.get(seq_id)
        if row is None or drafted <= 0:
            return
        row.rate += RATE_WEIGHT * (accepted / drafted - row.rate)
        if accepted >= drafted:
            row.trust = min(self.max_tokens, 2 * row.trust)
        elif accepted > 0:
            row.trust = min(self.max_tokens, max(row.trust, accepted + 1))
        else:
            row.trust = max(1, row.trust // 2)

    def rate(self, seq_id: str) -> float:
        """The share of this row's drafts expected to hold."""
        row = self._rows.get(seq_id)
        return PRIOR_RATE if row is None else row.rate

    def skipped(self, seq_id: str) -> None:
        """A row's draft was not verified (not worth its width): its rate drifts back toward
        the prior, so a row that stopped drafting tries again now and then."""
        row = self._rows.get(seq_id)
        if row is not None:
            row.rate += (PRIOR_RATE - row.rate) / 16

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
