"""How a step's new prompts are cut so their transient arrays fit a memory budget (no MLX).

`cost(rows, width, keys)` is what a prefill of `rows` prompts padded to `width` new tokens,
attending over `keys` positions, allocates and frees (models/memory.py's estimate): new
prompts prefill in batches within the budget, and a prompt over it alone, in pieces that fit.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.outputs import ScheduledSeq

Cost = Callable[[int, int, int], int]
MIN_PIECE = 64  # tokens: smaller pieces cost more in per-call overhead than they save


def batches(fresh: list[ScheduledSeq], cost: Cost, budget: int) -> list[list[ScheduledSeq]]:
    """New prompts in batches whose padded transient arrays fit `budget`, shortest first so a
    batch pads little (one long prompt padded 16 short ones to its length and held 0.3-0.6 GB
    of scores and activations); a prompt over the budget makes a batch of its own."""
    out: list[list[ScheduledSeq]] = [[]]
    for sched in sorted(fresh, key=lambda s: s.seq.num_prefill):
        group = [*out[-1], sched]
        width = max(s.seq.num_prefill - 1 - s.start for s in group)
        keys = max(s.start for s in group) + width  # cached prefixes are left-padded
        if out[-1] and cost(len(group), width, keys) > budget:
            out.append([sched])
        else:
            out[-1] = group
    return out


def pieces(start: int, end: int, cost: Cost, budget: int) -> list[tuple[int, int]]:
    """[start, end) of one prompt cut into consecutive pieces whose transients fit `budget`
    (none under MIN_PIECE tokens unless it is the last): the widest that fits, again and again."""
    out: list[tuple[int, int]] = []
    while start < end:
        lo, hi = min(MIN_PIECE, end - start), end - start
        while lo < hi:  # the widest piece within the budget (cost grows with the width)
            mid = (lo + hi + 1) // 2
            if cost(1, mid, start + mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        out.append((start, start + lo))
        start += lo
    return out
