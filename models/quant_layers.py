"""Quantized weights on the CPU backend, multiplied by mlxd's kernels (models/qkernels.py).

`quantize_for_cpu` swaps a loaded model's quantized layers for subclasses of MLX's
QuantizedLinear / QuantizedEmbedding whose matmuls call `qkernels.qmm` (same arrays, same
parameter names; the swap goes through nn.Module's public `update_modules`). Activations stay
float32: MLX's half-precision ops are slower than fp32 on the CPU. With fmt "q8" every matmul
weight (Linear, Embedding and so a tied lm_head) becomes 8-bit group-32 first; with "as_stored" only
those the kernels cannot read as stored do.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from models import qkernels
from models.swap import replace_module

GROUP = qkernels.GROUP_SIZE
_MATMUL = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)


def _init(
    layer: nn.Module, weight: mx.array, scales: mx.array, biases: mx.array, bits: int
) -> None:
    nn.Module.__init__(layer)
    layer.group_size, layer.bits, layer.mode = GROUP, bits, "affine"
    layer.weight, layer.scales, layer.biases = weight, scales, biases
    layer.freeze()


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul is `qkernels.qmm` (float32 out)."""

    def __init__(self, weight, scales, biases, bits: int, bias: mx.array | None = None):
        _init(self, weight, scales, biases, bits)
        if bias is not None:
            self.bias = bias.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = qkernels.qmm(x, self.weight, self.scales, self.biases, self.bits)
        return y + self.bias if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding with float32 lookups (one kernel op on the CPU) and `as_linear` (a
    tied lm_head) on the kernel."""

    def __init__(self, weight, scales, biases, bits: int):
        _init(self, weight, scales, biases, bits)
        self.num_embeddings, self.dims = weight.shape[0], weight.shape[1] * 32 // bits

    def __call__(self, x: mx.array) -> mx.array:
        y = qkernels.embed_rows(x, self["weight"], self["scales"], self["biases"], self.bits)
        return y if y is not None else super().__call__(x).astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return qkernels.qmm(x, self.weight, self.scales, self.biases, self.bits)


def _half_scales(arrays: tuple) -> tuple:
    """float16 scales and biases (as GGUF's Q8_0 keeps them) unless a value overflows float16."""
    w, scales, biases = arrays
    limit = float(mx.finfo(mx.float16).max)
    if mx.all(mx.maximum(mx.abs(scales).max(), mx.abs(biases).max()) < limit).item():
        scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    return w, scales, biases


def _quantized(m: nn.Module) -> bool:
    return isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)


def _cpu_layer(m: nn.Module, fmt: str) -> nn.Module | None:
    """The kernel-backed replacement of a matmul layer, or None to leave it alone."""
    if not isinstance(m, _MATMUL) or isinstance(m, CpuQuantizedLinear | CpuQuantizedEmbedding):
        return None
    fast = _quantized(m) and qkernels.supports(m.bits, m.group_size, m.mode)
    if fast and (fmt != "q8" or m.bits == 8):
        arrays, bits = (m.weight, m.scales, m.biases), m.bits
    else:  # "q8", or "as_stored" for a layer the kernels cannot read as stored
        if _quantized(m):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=m.mode)
        else:
            w = m.weight
        if w.shape[-1] % GROUP:
            return None
        arrays, bits = _half_scales(qkernels.quantize8(w)), 8
        mx.eval(arrays)
    if isinstance(m, nn.Embedding | nn.QuantizedEmbedding):
        return CpuQuantizedEmbedding(*arrays, bits)
    return CpuQuantizedLinear(*arrays, bits, m.get("bias"))


def quantize_for_cpu(model: nn.Module, fmt: str) -> int:
    """Put the kernels under every matmul weight: "as_stored" keeps layers the kernels read
    (group-32 4 or 8 bits: GGUF's Q4_0 / Q4_1 / Q8_0) and makes the others 8-bit group-32 (float
    weights, so also k-quant GGUFs, which import as float16; other MLX quantizations); "q8" makes
    all of them 8-bit. One module at a time, so the peak stays near the final size. Returns how
    many layers run on the kernels."""
    swapped = 0
    for name, module in list(model.named_modules()):
        new = _cpu_layer(module, fmt)
        if new is not None:
            replace_module(model, name, new)
            swapped += 1
    return swapped
