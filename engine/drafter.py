"""Prompt-lookup (n-gram) drafting: guesses of a row's next tokens, taken from its own prompt and
output (no draft model). No MLX: the scheduler drafts, the runner verifies.

For each sequence an index maps every n-gram seen (n = MAX_NGRAM down to MIN_NGRAM) to where its
most recent occurrence continued; the draft is what followed the longest n-gram ending the text.
The index grows with the text (O(new tokens) a step, not a scan of the context). A rejected
draft costs compute (every drafted position is computed), so a draft's length follows how much
evidence backs it: a 4-gram match drafts up to k tokens, a 3-gram k / 2, a 2-gram one; and a
per-row trust, halved by a draft that missed entirely and doubled by one that held, caps it.
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


def speculates(mode: str, running: int) -> bool:
    """Whether rows may draft this step: `mode` is the `speculative` setting."""
    return mode == "on" or (mode == "auto" and running <= AUTO_MAX_ROWS)


def fit_width(drafts: list[int], rows: int, positions: int = 0) -> int:
    """The widest draft a step verifies, given each drafting row's draft length and the rows
    of the decode batch. Every row computes as many positions as the widest draft (filler
    where it drafted less). A step of B rows costs base + c * positions and yields B tokens
    plus the accepted drafts A; widening it by W pays while A > B^2 c W / (base + c B). With
    c ~ base / 3 (the CPU kernels, SmolLM2: a fused one-position step against the positions of
    a verify pass) and half the drafts accepted (chat; copying a text holds ~90%), the drafts
    must fill 2 B^2 / (B + 3) times the width: a row drafting alone pays, among 2 rows both
    must draft, among 3 all, among 4 never. `positions` (0: none) caps B (1 + W), the runner's
    bound for exact verification."""
    width = max(drafts, default=0)
    if positions:
        width = max(0, min(width, positions // max(1, rows) - 1))
    need = 2 * rows * rows / (rows + 3)
    while width and sum(min(d, width) for d in drafts) < need * width:
        width -= 1
    return width


def can_draft(p: SamplingParams) -> bool:
    """Rows whose verification is exact: greedy, and nothing that would have to be applied per
    drafted position (grammar masks, history-dependent penalties and processors, logit bias)
    or reported per accepted token (logprobs). Sampled rows never speculate, so a seeded
    stream draws exactly the tokens it would draw without speculation."""
    return (
        p.greedy
        and p.grammar is None
        and not p.logits_processors
        and not p.logit_bias
        and not p.logprobs
        and not p.prompt_logprobs
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.max_tokens > 0
    )


@dataclass
class _Index:
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> continuation
    indexed: int = 0  # n-grams ending before this position are in `ngrams`
    trust: int = 1  # the longest draft this row makes now


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
        if accepted >= drafted:
            row.trust = min(self.max_tokens, 2 * row.trust)
        elif accepted > 0:
            row.trust = min(self.max_tokens, max(row.trust, accepted + 1))
        else:
            row.trust = max(1, row.trust // 2)

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
