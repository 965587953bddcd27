"""What KV arrays take while they change: a prefilling sequence's own caches sized to what they
hold, and a batch's caches rewritten one layer at a time (MLX; the engine thread).

mlx-lm's KVCache grows in steps of 256 positions, room a decoding sequence fills later. A
sequence here only prefills into its own caches, then joins the decode batch (a copy of the
positions it holds): a 90-token prompt allocated 256 positions a layer (11.8 MB for SmolLM2,
2.8x its KV), alive until the batch's copy was computed, and counted as the copy's 3.8 MB.

Rows joining or leaving rewrite every layer's batch cache (mlx-lm's extend / filter: a copy),
lazily. The decode step after reads all the layers in one op (models/fused_stack.py), so every
new copy was made before any old one could go: the soak saw 200-340 MB over the KV in use at
such steps (~half of a 650 MB KV). Computed one layer after the other first, the copies take
one layer's KV beyond it.
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
    """Compute a batch's per-layer caches one layer at a time, each layer's old arrays freed
    before the next layer's copy is made."""
    for c in caches:
        arrays = [
            a for a in (getattr(c, "keys", None), getattr(c, "values", None)) if a is not None
        ]
        if arrays:
            mx.eval(arrays)
