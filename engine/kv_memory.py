"""What KV arrays take while they change: a prefilling sequence's own caches sized to what they
hold, and a batch's caches rewritten one layer at a time (MLX; the engine thread).

mlx-lm's KVCache grows in steps of 256 positions, room a decoding sequence fills later. A
sequence here only prefills into its own caches, then joins the decode batch (a copy of the
positions it holds): a 90-token prompt allocated 256 positions a layer (11.8 MB for SmolLM2,
2.8x its KV), alive until the batch's copy was computed, and counted as the copy's 3.8 MB.

Rows joining or leaving rewrite every layer's batch cache (mlx-lm's extend / filter: a copy),
lazily. The decode step after reads all the layers in one op (models/fused_stack.py), so every
new copy was made before any old one could go: the soak saw 200-340 MB over the KV in use at
such steps (~half of a 650 MB KV). Computed first, layer after layer and contiguous, the
copies take a few layers' KV beyond it.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache

PROMPT_STEP = 1  # positions a prefilling sequence's cache grows by beyond what it writes


def fit_to_prompt(caches: list) -> list:
    """`caches` (a sequence's per-layer caches), their plain KV caches set to grow by exactly
    what each update writes (the step is mlx-lm's per-class setting, set on these instances;
    a prompt in pieces copies its caches at each piece either way: a piece is wider than the
    room a step leaves). Rotating caches keep theirs: they wrap within a window."""
    for c in caches:
        if type(c) is KVCache:
            c.step = PROMPT_STEP
    return caches


def settle(caches: list) -> None:
    """Compute a batch's per-layer caches now, layer after layer (the CPU backend queues a
    few ops ahead, so each layer's old arrays go as its copy is made), each made contiguous:
    rows leaving cut the left padding all rows share with a slice (mlx-lm's filter), a view
    the decode op cannot write in place, so it copied every layer at once (720 MB over a
    607 MB KV in the soak). Queued, not waited for (a wait per layer cost a single stream's
    cached-prompt TTFT ~9 ms): what comes after runs after it."""
    arrays = []
    for c in caches:
        if getattr(c, "keys", None) is None or getattr(c, "values", None) is None:
            continue
        c.keys, c.values = mx.contiguous(c.keys), mx.contiguous(c.values)
        arrays += [c.keys, c.values]
    mx.async_eval(arrays)


def keep_rows(batch: list, keep: list[int]) -> list | None:
    """The batch's per-layer caches with rows `keep` only (mlx-lm's filter), settled now, not
    at the step's decode: the KV counted is the smaller batch's from here on, while the old
    one lived on through the step's prefills (seconds; 150 MB over the soak's bound). None
    when no row is left."""
    if not keep:
        return None
    idx = mx.array(keep, dtype=mx.int32)
    for c in batch:
        c.filter(idx)
    settle(batch)
    return batch
