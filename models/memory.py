"""How much memory the device offers, which backend runs, and what the KV cache of a model costs."""

from __future__ import annotations

import functools
import os
from typing import Any

import mlx.core as mx

from models.files import text_config

DEFAULT_FRACTION = 0.75  # of system (CPU) or recommended working set (Metal) memory


@functools.cache
def backend() -> str:
    """ "metal", "cuda" or "cpu": where MLX runs by default. The one device probe (doctor,
    loader, registry and /api/ps ask this); cached, the default device does not change."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def system_memory_bytes() -> int:
    """Physical RAM from sysconf (no psutil); 0 if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory_bytes() -> int:
    """Memory the device can use: the recommended working set (Metal), its memory size (CUDA),
    or system RAM (CPU)."""
    if backend() != "cpu":
        try:
            info = mx.device_info()
            size = info.get("max_recommended_working_set_size") or info.get("memory_size")
            if size:
                return int(size)
        except (RuntimeError, AttributeError):
            pass
    return system_memory_bytes()


def default_memory_limit(fraction: float = DEFAULT_FRACTION) -> int:
    """The memory limit used when the setting is 0: a safe fraction of the device's memory."""
    return int(device_memory_bytes() * fraction)


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int = 4) -> int:
    """Keys plus values of one token over all layers: layers x kv heads x head dim x 2 x dtype size."""
    layers = int(text_config(config).get("num_hidden_layers", 0))
    _, _, kv_heads, head_dim, _ = _shape(config)
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def _shape(config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """A layer's sizes: (hidden, query heads, kv heads, head dim, MLP intermediate)."""
    cfg = text_config(config)
    hidden = int(cfg.get("hidden_size", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // max(heads, 1))
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    return hidden, heads, kv_heads, head_dim, inter


def _dims(config: dict[str, Any]) -> tuple[int, int, int]:
    """(bytes a token's activations take in one layer / dtype size, query heads, vocab size)."""
    hidden, heads, kv_heads, head_dim, inter = _shape(config)
    per_token = 4 * hidden + 3 * inter + (heads + 2 * kv_heads) * head_dim
    return per_token, heads, int(text_config(config).get("vocab_size", 0))


def step_activation_bytes(
    config: dict[str, Any], tokens: int, rows: int, dtype_bytes: int = 4
) -> int:
    """Bytes of the arrays one step makes and frees: one layer's activations of `tokens` tokens
    (layers run in turn, each reusing the buffers the last one freed: projections, MLP, norms)
    plus `rows` rows of logits and the float32 copies sampling makes of them.

    A long prompt chunk's attention scores (heads x tokens x keys) are left out: such one-off
    buffers cost less to allocate again than the chunk costs to compute."""
    per_token, _, vocab = _dims(config)
    return dtype_bytes * tokens * per_token + 3 * 4 * rows * vocab


def layer_weight_floats(config: dict[str, Any]) -> int:
    """Matmul weights of one layer, in numbers (attention projections and the MLP)."""
    hidden, heads, kv_heads, head_dim, inter = _shape(config)
    return hidden * (2 * heads + 2 * kv_heads) * head_dim + 3 * hidden * inter


def prefill_activation_bytes(
    config: dict[str, Any],
    rows: int,
    width: int,
    keys: int,
    dtype_bytes: int = 4,
    dequantized_from: int = 0,
) -> int:
    """Bytes a batched prefill allocates and frees: `rows` prompts padded to `width` new tokens
    each, attending over `keys` positions (the longest cached prefix plus `width`). One layer's
    activations of every padded token, plus its attention scores, their softmax and the mask
    (float32, width x keys a row and head; the CPU backend's attention materializes them).
    From `dequantized_from` padded tokens on (> 0: quantized weights on mlxd's kernels, which
    hand such matmuls to the BLAS), two layers' weights in float32 too (measured: SmolLM2 Q4_1,
    one 128-token prompt, 33 MB of transients, 5 MB of them activations)."""
    per_token, heads, _ = _dims(config)
    padded = rows * width
    total = dtype_bytes * padded * per_token + 4 * padded * keys * (2 * heads + 1)
    if 0 < dequantized_from <= padded:
        total += 2 * 4 * layer_weight_floats(config)
    return total
