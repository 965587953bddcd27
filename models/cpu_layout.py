"""fp32 weights laid out for the CPU backend's BLAS.

mlx's Linear computes `x @ W.T` with W stored [out, in]. For the small-M GEMMs of batched decoding
(M = the number of sequences), MKL runs `x @ Wt` with Wt stored [in, out] contiguous several times
faster (measured on 2-core x86-64: 16x576 @ 576x1536 0.19 ms against 0.85 ms; the 49152-wide
lm_head 16 ms against 28 ms). So on the CPU backend the loader swaps in modules that keep the
transposed weight. The swap uses nn.Module's public `update_modules`, as mlx-lm's own
(de)quantization does; model code is untouched and just calls its layers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models import qkernels
from models.fast_math import fast_exp
from models.swap import replace_module, swap_modules


class TransposedLinear(nn.Module):
    """y = x @ weight_t (+ bias), weight_t stored [in, out]."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.weight_t = mx.contiguous(weight.T)
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight_t
        return y + self.bias if "bias" in self else y

    # `weight` reads and writes in nn.Linear's [out, in] layout, for code that inspects layers.
    @property
    def weight(self) -> mx.array:
        return self.weight_t.T

    def __setattr__(self, name: str, value: object) -> None:
        if name == "weight" and isinstance(value, mx.array):
            name, value = "weight_t", mx.contiguous(value.T)
        super().__setattr__(name, value)


class TransposedEmbedding(nn.Module):
    """An embedding whose table is stored [dims, vocab]: `as_linear` (a tied lm_head, the largest
    matmul of a small model) runs on the fast layout; lookups gather columns."""

    def __init__(self, weight: mx.array):
        super().__init__()
        self.weight_t = mx.contiguous(weight.T)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.weight_t, ids, axis=1), 0, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t

    @property
    def weight(self) -> mx.array:
        return self.weight_t.T


def transpose_for_cpu(model: nn.Module) -> int:
    """Swap fp32 Linear / Embedding modules for their transposed forms, one at a time (the peak
    stays one layer above the model's size). Returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.dtype == mx.float32:
            new: nn.Module = TransposedLinear(module.weight, module.get("bias"))
        elif type(module) is nn.Embedding and module.weight.dtype == mx.float32:
            new = TransposedEmbedding(module.weight)
        else:
            continue
        mx.eval(new.parameters())
        replace_module(model, name, new)
        swapped += 1
    return swapped


# --- SwiGLU without MLX's slow CPU exp ------------------------------------------------------
@mx.compile
def _poly_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate / (1.0 + fast_exp(-gate)) * x


def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's swiglu: mlxd's kernel on the CPU (one pass, vectorized exp:
    0.03 ms for a 84 x 1536 prefill against 0.5 for the compiled polynomial), else with the
    polynomial exp (models/fast_math.py)."""
    y = qkernels.swiglu(gate, x)
    return y if y is not None else _poly_swiglu(gate, x)


class FastSwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the llama-family MLP with `fast_swiglu`."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fast_swiglu(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    # mlx-lm's llama / qwen / mistral MLPs: three projections and `down(swiglu(gate, up))`.
    call = type(module).__call__
    names = set(getattr(getattr(call, "__code__", None), "co_names", ()))
    children = set(module.children())
    return names >= {"swiglu", "gate_proj", "up_proj", "down_proj"} and children == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def fast_activations(model: nn.Module) -> int:
    """Swap SwiGLU MLPs for FastSwiGLUMLP (same weights, same children); returns the count."""
    return swap_modules(model, lambda m: FastSwiGLUMLP(m) if is_swiglu_mlp(m) else None)
