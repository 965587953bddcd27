"""RMSNorm and RoPE modules on mlxd's one-pass CPU kernels (models/qkernels.py).

MLX's CPU `fast.rms_norm` and `fast.rope` cost 50-130 us for one decode row (several ops each),
about a fifth of a SmolLM2 decode step once the matmuls run on quantized kernels. `fuse_for_cpu`
swaps a loaded model's nn.RMSNorm / nn.RoPE instances for these (same parameters, same results)
through nn.Module's public `update_modules`; other norm classes (gemma's 1 + w) are left alone.
Attention layers get their fused decode step too (models/fused_attention.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models import qkernels
from models.fused_attention import FusedAttention, fuse_attention
from models.quant_layers import CpuQuantizedLinear
from models.swap import swap_modules


class FastRMSNorm(nn.Module):
    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight = norm.weight.astype(mx.float32)
        self.eps = norm.eps

    def __call__(self, x: mx.array) -> mx.array:
        return qkernels.rms_norm(x, self.weight, self.eps)


class FastRoPE(nn.Module):
    def __init__(self, rope: nn.RoPE):
        super().__init__()
        self.dims, self.traditional = rope.dims, rope.traditional
        self.base, self.scale = rope.base, rope.scale

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return qkernels.rope(x, self.dims, self.traditional, self.base, self.scale, offset)


def fuse_for_cpu(model: nn.Module) -> int:
    """Swap nn.RMSNorm and nn.RoPE instances and supported attention layers for the fused
    ones; returns how many."""
    return swap_modules(model, _fast_layer) + fuse_attention(model)


def _fast_layer(m: nn.Module) -> nn.Module | None:
    if type(m) is nn.RMSNorm:
        return FastRMSNorm(m)
    if type(m) is nn.RoPE and m.base is not None:
        return FastRoPE(m)
    return None


def verifies_cheaply(model: nn.Module) -> bool:
    """Whether a pass over a few positions per row (a decode step and its speculative drafts)
    costs much less on the CPU than decoding them one by one: attention runs them on the fused
    kernel (MLX's masked SDPA made each position cost ~a whole decode step) and the projections
    on the quantized kernels (the fp32 BLAS path's few-row GEMMs cost several GEMVs each)."""
    kinds = {type(m) for _, m in model.named_modules()}
    return FusedAttention in kinds and CpuQuantizedLinear in kinds and qkernels.available()
