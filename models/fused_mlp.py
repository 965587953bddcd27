"""The llama-family MLP as one kernel op on the CPU: down(silu(gate(x)) * up(x)).

Once the projections run on mlxd's quantized kernels (models/quant_layers.py), a decode step's
MLPs are four ops per layer (three matmuls and a SwiGLU), each paying MLX's dispatch and a graph
node. `fuse_mlps` swaps every SwiGLU MLP whose projections are kernel-backed for `FusedMLP`
(same children, same parameters; public `update_modules`), which issues one op for decode-sized
inputs and the unfused ops for prefill-sized ones (the BLAS path there is faster).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models import qkernels
from models.cpu_layout import fast_swiglu, is_swiglu_mlp
from models.quant_layers import CpuQuantizedLinear
from models.swap import swap_modules


class FusedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with kernel-backed projections, in one op on the CPU."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x: mx.array) -> mx.array:
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        # Projections swapped since the fusion (tensor-parallel sharding wraps down_proj in an
        # all_sum) run as they are.
        if x.size < qkernels.BLAS_ROWS * x.shape[-1] and _fusable_projections(g, u, d):
            y = qkernels.mlp(x, _packed(g), _packed(u), _packed(d))
            if y is not None:
                return y
        return d(fast_swiglu(g(x), u(x)))


def _packed(layer: nn.Module) -> qkernels.Packed:
    return layer.weight, layer.scales, layer.biases, layer.bits


def _fusable(m: nn.Module) -> bool:
    return is_swiglu_mlp(m) and _fusable_projections(m.gate_proj, m.up_proj, m.down_proj)


def _fusable_projections(g: nn.Module, u: nn.Module, d: nn.Module) -> bool:
    return (
        all(type(p) is CpuQuantizedLinear and "bias" not in p for p in (g, u, d))
        and g.bits == u.bits
        and g.weight.shape == u.weight.shape
        and g.scales.dtype == u.scales.dtype
    )


def fuse_mlps(model: nn.Module) -> int:
    """Swap kernel-backed SwiGLU MLPs for FusedMLP; returns how many."""
    return swap_modules(model, lambda m: FusedMLP(m) if _fusable(m) else None)
