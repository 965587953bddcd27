"""Attention layers whose decode step runs on mlxd's fused CPU kernel (models/qkernels.py).

MLX's CPU SDPA runs a decode step's attention as about eight ops (two batched matmuls, a where,
a softmax on MLX's slow exp), the class of a step's time that grows fastest with the batch.
`FusedAttention` takes over an mlx-lm attention layer of the llama / qwen2 / qwen3 / gemma3
shape (same children, same attributes, same parameters) and computes exactly what it does:
projections, optional q/k norms, RoPE at the cache's offsets, the cache's own
`update_and_fetch`, then attention on `qkernels.decode_attention` (one query position, drafts
being verified, a prefill chunk; quantized caches keep mlx-lm's SDPA). The swap uses nn.Module's
public `update_modules`, as fused_layers.py does.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma3_text, llama, qwen2, qwen3
from mlx_lm.models.base import scaled_dot_product_attention

from models import qkernels
from models.swap import swap_modules

# Layers whose __call__ is the sequence FusedAttention.__call__ reproduces (read in mlx-lm
# 0.32; tests/unit/test_fused_attention.py compares each with its original).
SUPPORTED: tuple[type[nn.Module], ...] = (
    llama.Attention,
    qwen2.Attention,
    qwen3.Attention,
    gemma3_text.Attention,
)


class FusedAttention(nn.Module):
    """An mlx-lm attention layer (see SUPPORTED) with decode attention on the fused kernel."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        for key, value in vars(attn).items():  # head counts, scale, is_sliding, ...
            if not key.startswith("_"):
                setattr(self, key, value)
        for name, child in attn.children().items():
            setattr(self, name, child)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = _heads(self.q_proj(x), self.n_heads)
        k = _heads(self.k_proj(x), self.n_kv_heads)
        v = _heads(self.v_proj(x), self.n_kv_heads)
        if "q_norm" in self:  # qwen3, gemma3: per-head norms before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            q = self.rope(q, offset=cache.offset)
            k = self.rope(k, offset=cache.offset)
            k, v = cache.update_and_fetch(k, v)
        else:
            q, k = self.rope(q), self.rope(k)
        if hasattr(cache, "bits"):  # quantized caches keep mlx-lm's path
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        else:
            # Drafts being verified attend as if decoded alone (same bits); so do prefill chunks.
            out = qkernels.decode_attention(q, k, v, self.scale, mask)
            if L == 1:
                # [B, H, 1, D] is already [B, 1, H, D] in memory: no transpose (and no copy).
                return self.o_proj(out.reshape(B, L, -1))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def _heads(y: mx.array, n: int) -> mx.array:
    """[B, L, n * D] as [B, n, L, D]; for one position a reshape alone (same memory order)."""
    B, L, _ = y.shape
    if L == 1:
        return y.reshape(B, n, 1, -1)
    return y.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def fuse_attention(model: nn.Module) -> int:
    """Swap the model's SUPPORTED attention layers for FusedAttention; returns how many."""
    return swap_modules(model, lambda m: FusedAttention(m) if type(m) in SUPPORTED else None)
