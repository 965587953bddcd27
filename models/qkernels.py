"""mlxd's CPU kernels (kernels/, an MLX C++ extension built by `make install`), with plain-MLX
fallbacks so every caller works when the extension is not built or the device is not the CPU.

`qmm(x, w, scales, biases, bits)` is `x @ dequantize(w)^T` for MLX affine group-32 arrays (GGUF's
Q4_0 / Q4_1 / Q8_0 as the registry keeps them), returned in float32; `mlp` is a SwiGLU MLP over
three of them in one op. `rms_norm` and `rope` are mx.fast's in one pass (MLX's CPU versions run
as several ops: 50-130 us for one decode row).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx

log = logging.getLogger("mlxd.kernels")

GROUP_SIZE = 32
BITS = (4, 8)
# From this many rows of x on, qmm dequantizes and calls the BLAS. A short prompt's prefill runs
# on the kernels: SmolLM2 Q4_1, 84-token prompt, in-process A/B, loaded machine: 0.82x the time
# of the BLAS path (no fp32 weights made per call, the fused MLP); at 208 tokens 1.18x.
BLAS_ROWS = 96
_STATUS = Path(__file__).with_name("_kernels.json")
_ext: ModuleType | None = None
_reason: str | None = None
# A Device to compare with: `default_device() == mx.cpu` converts the DeviceType on every call
# (0.8 us against 0.2; a decode step makes ~4 such checks a layer).
_CPU = mx.Device(mx.cpu)


def _load() -> None:
    global _ext, _reason
    if _ext is not None or _reason is not None:
        return
    status: dict = {}
    try:
        status = json.loads(_STATUS.read_text())
    except (OSError, ValueError):
        _reason = "not built (run `make install` or `make kernels`)"
        return
    if not status.get("ok"):
        _reason = f"not built: {status.get('reason') or 'unknown reason'}"
        return
    version = getattr(mx, "__version__", "")
    if status.get("mlx") != version:
        _reason = f"built for mlx {status.get('mlx')}, mlx {version} installed: `make kernels`"
        return
    try:
        from models import _kernels  # type: ignore[attr-defined]
    except ImportError as e:
        _reason = f"cannot be imported ({e})"
        return
    _ext = _kernels


def available() -> bool:
    """True when the extension is built for this mlx and imports."""
    _load()
    return _ext is not None


def unavailable_reason() -> str | None:
    """Why the kernels are not used (None when they are available)."""
    _load()
    return _reason


def simd_path() -> str:
    return _ext.simd_path() if available() and _ext is not None else "none"


def int_activations() -> bool:
    """True when the quantized matmul multiplies int8 activations (AVX-512 VNNI, arm64 SDOT):
    x rounded to ~15 bits per 32-value block (kernels/qdot_i8.h)."""
    return simd_path() in ("avx512-vnni", "neon-dotprod")


def num_threads() -> int:
    return int(_ext.num_threads()) if available() and _ext is not None else 0


def background_stream(stream: mx.Stream) -> bool:
    """Run CPU `stream`'s thread in the background (from its next task on): its kernel calls
    never take the shared worker threads, and on Linux it gets only the cores no other thread
    wants. False when the kernels are not built (the stream is left as it is)."""
    if not available() or _ext is None:
        return False
    _ext.background_stream(stream)
    return True


def supports(bits: int, group_size: int, mode: str = "affine") -> bool:
    """Whether `qmm` runs a layer quantized this way on the fast path."""
    return mode == "affine" and group_size == GROUP_SIZE and bits in BITS


def qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, bits: int) -> mx.array:
    """float32 `x @ dequantize(w, scales, biases)^T` (group size 32): the extension on the CPU,
    MLX's own quantized_matmul elsewhere or when it is not built."""
    if biases is None:
        raise ValueError("qmm needs affine biases")
    ext = _cpu_ext()
    if ext is not None:
        if x.size >= BLAS_ROWS * x.shape[-1]:
            # Longer prefills: the BLAS on dequantized weights is faster there.
            return x.astype(mx.float32) @ ext.dequantize(w, scales, biases, bits).T
        return ext.qmm(x, w, scales, biases, bits)
    y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=GROUP_SIZE, bits=bits)
    return y.astype(mx.float32)


Packed = tuple[mx.array, mx.array, mx.array, int]  # weight, scales, biases, bits


def mlp(x: mx.array, gate: Packed, up: Packed, down: Packed) -> mx.array | None:
    """down(silu(gate(x)) * up(x)) in one op on the CPU for float32 x; None where the extension
    cannot run it (not built, another device): the caller runs the unfused ops."""
    if not (_fast(x) and _ext is not None and gate[3] == up[3]):
        return None
    return _ext.mlp(x, *gate[:3], *up[:3], gate[3], *down)


def mlp_residual(
    h: mx.array,
    norm: tuple[mx.array, float],
    gate: Packed,
    up: Packed,
    down: Packed,
    gelu: bool = False,
    post_norm: mx.array | None = None,
):
    """h + down(act(gate(n)) * up(n)) with n = mx.fast.rms_norm(h, *norm) and act silu, or
    GELU-tanh (`gelu`: gemma's MLP); with `post_norm` the MLP's output goes through
    rms_norm(., post_norm, eps) before the add (gemma's post-feedforward norm). One op on the CPU
    for float32 h; None where the extension cannot run it."""
    if not (_fast(h) and _ext is not None and gate[3] == up[3] and norm[0].dtype == mx.float32):
        return None
    if post_norm is not None and post_norm.dtype != mx.float32:
        return None
    return _ext.mlp_residual(h, *norm, *gate[:3], *up[:3], gate[3], *down, gelu, post_norm)


def qmm_add(
    x: mx.array, w: Packed, residual: mx.array, norm: tuple[mx.array, float] | None = None
) -> mx.array:
    """residual + qmm(x, *w), or with `norm` (weight, eps) residual + rms_norm(qmm(x, *w)): one
    op on the CPU for float32 inputs, two or three elsewhere."""
    if _fast(x) and _ext is not None and residual.dtype == mx.float32:
        if norm is None:
            return _ext.qmm_add(x, *w[:3], w[3], residual)
        if norm[0].dtype == mx.float32:
            return _ext.qmm_add(x, *w[:3], w[3], residual, *norm)
    y = qmm(x, *w)
    return residual + (y if norm is None else mx.fast.rms_norm(y, *norm))


def attn_in(
    x: mx.array,
    norm: tuple[mx.array, float],
    q: Packed,
    k: Packed,
    v: Packed,
    offset: int | mx.array,
    heads: tuple[int, int],
    rope: tuple[int, bool, float, float],
    qk_norm: tuple[mx.array, mx.array] | None = None,
    qkv_bias: tuple[mx.array, mx.array, mx.array] | None = None,
) -> list[mx.array] | None:
    """A decode step's [q, k, v] ([B, H, 1, D] each) from x [B, 1, K]: RMSNorm (weight, eps),
    the three projections plus `qkv_bias` (qwen2's), with `qk_norm` (q and k weights [D])
    per-head RMSNorms of q and k at the same eps, and RoPE (dims, traditional, base, scale) at
    each row's offset on q and k, in one op on the CPU; None where the extension cannot run it."""
    if not (_fast(x) and _ext is not None and q[3] == k[3] == v[3] and x.ndim == 3):
        return None
    off = offset if isinstance(offset, mx.array) else mx.array([offset], dtype=mx.int32)
    if x.shape[1] != 1 or off.size not in (1, x.shape[0]) or norm[0].dtype != mx.float32:
        return None
    if qk_norm is not None and not qk_norm[0].dtype == qk_norm[1].dtype == mx.float32:
        return None
    if qkv_bias is not None and any(b.dtype != mx.float32 for b in qkv_bias):
        return None
    qn, kn = qk_norm if qk_norm is not None else (None, None)
    qb, kb, vb = qkv_bias if qkv_bias is not None else (None, None, None)
    return _ext.attn_in(
        x, *norm, *q[:3], *k[:3], *v[:3], q[3], off, *heads, *rope, qn, kn, qb, kb, vb
    )


def layer_plan(
    norms: tuple[tuple[mx.array, float], tuple[mx.array, float]],
    projs: list[Packed],
    attn: tuple[int, float, tuple[int, bool, float, float]],
    qk_norm: tuple[mx.array, mx.array] | None = None,
    qkv_bias: tuple[mx.array, mx.array, mx.array] | None = None,
) -> Any | None:
    """A decoder layer's weights and settings for `decoder_stack`, checked once: `norms` the
    input and post-attention RMSNorms (weight, eps), `projs` q, k, v, o, gate, up, down, `attn`
    (query heads, attention scale, RoPE's (dims, traditional, base, scale)), qk_norm and
    qkv_bias as attn_in's. None where the extension cannot run such a layer."""
    ext = _cpu_ext()
    (n1, eps1), (n2, eps2) = norms
    extras = (n1, n2, *(qk_norm or ()), *(qkv_bias or ()))
    if ext is None or any(a.dtype != mx.float32 for a in extras):
        return None
    q, k, v, o, gate, up, down = projs
    if not q[3] == k[3] == v[3] or gate[3] != up[3]:
        return None
    weights = [n1, *q[:3], *k[:3], *v[:3], *o[:3], n2, *gate[:3], *up[:3], *down[:3]]
    heads, scale, rope = attn
    qn, kn = qk_norm if qk_norm is not None else (None, None)
    qb, kb, vb = qkv_bias if qkv_bias is not None else (None, None, None)
    bits = [q[3], o[3], gate[3], down[3]]
    try:
        return ext.layer_plan(weights, bits, eps1, eps2, heads, *rope, scale, qn, kn, qb, kb, vb)
    except ValueError:  # shapes the kernel does not take (say more than 64 q heads a kv head)
        return None


def decoder_stack(
    plans: list[Any],
    x: mx.array,
    keys: list[mx.array],
    values: list[mx.array],
    offset: mx.array,
    idx: int,
    mask: Any,
) -> list[mx.array] | None:
    """Decoder layers' step in one op on the CPU from x [B, T, K] (a decode step's one position
    a row, or a verify pass's T, each computed as a one-position step there computes it): layer
    i (`plans[i]` from layer_plan) with its cache's float32 buffers keys[i] [B, Hk, C, D] and
    values[i] [B, Hk, C, Dv] (one dtype for all: the first layer's is checked here), the rows'
    positions `offset` (int32 [B]: one batch, every layer's cache holds the same ones), the
    first position idx written (idx + T <= C) and `mask` None or a bool key mask [B or 1, 1, T,
    idx + T]. Returns [y, offset + T, then each layer's keys and values with the new positions
    written], as attn_in, the cache's kv_update, decode_attention, qmm_add and mlp_residual give
    them layer by layer. None where the extension cannot run it, and from BLAS_ROWS rows B * T
    on (those matmuls go to the BLAS)."""
    if isinstance(mask, str) and mask == "causal" and x.ndim == 3 and x.shape[1] == 1:
        mask = None  # one query position: the last one sees every key
    if not (_fast(x) and _ext is not None and x.ndim == 3 and x.shape[0] * x.shape[1] < BLAS_ROWS):
        return None
    if offset.dtype != mx.int32 or offset.ndim != 1:
        return None
    k0, v0 = keys[0], values[0]
    if k0.dtype != mx.float32 or v0.dtype != mx.float32 or k0.ndim != 4:
        return None
    T = x.shape[1]
    if not 0 <= idx <= k0.shape[2] - T:
        return None
    if mask is not None and not (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.shape[1:] == (1, T, idx + T)
        and mask.shape[0] in (1, x.shape[0])
    ):
        return None
    return _ext.decoder_stack(plans, x, keys, values, offset, idx, mask)


def quantize8(w: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(uint32 weights, float32 scales, float32 biases): `mx.quantize(w.astype(float32), 32, 8)`,
    bit for bit; one multithreaded pass on the CPU (MLX's is a scalar loop after a float32
    cast: gemma3's 262144 x 640 float16 embedding took 1.4 s, 0.22 s here)."""
    ext = _cpu_ext()
    if ext is None or w.dtype not in (mx.float32, mx.float16, mx.bfloat16) or w.shape[-1] % 32:
        q, scales, biases = mx.quantize(w.astype(mx.float32), GROUP_SIZE, 8)
        return q, scales, biases
    q, scales, biases = ext.quantize8(w)
    return q, scales, biases


def embed_rows(
    ids: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int
) -> mx.array | None:
    """float32 [*ids.shape, K]: the rows of a group-32 quantized table (4 or 8 bits) that
    `mx.dequantize(w[ids], scales[ids], biases[ids]).astype(float32)` gives, bit for bit, in one
    op on the CPU (MLX's CPU dequantize of a lookup is ~37 graph nodes); None where the
    extension cannot run it."""
    ext = _cpu_ext()
    if ext is None or not supports(bits, GROUP_SIZE):
        return None
    if ids.dtype not in (mx.int32, mx.uint32, mx.int64, mx.uint64):
        return None
    return ext.embed_rows(ids, w, scales, biases, bits)


def kv_update(
    keys: mx.array, values: mx.array, offset: mx.array, k: mx.array, v: mx.array, idx: int
) -> list[mx.array] | None:
    """A batch KV cache's update in one op on the CPU: [keys, values] (buffers [B, H, C, D])
    with k, v [B, H, L, D] written at positions [idx, idx + L), offset [B] + L, and views of the
    buffers' first idx + L positions; the buffers are written in place when nothing else holds
    them. None where the extension cannot run it (another device, dtypes or shapes it does not
    take): the cache runs its own ops."""
    ext = _cpu_ext()
    if ext is None or offset.dtype != mx.int32:
        return None
    if not keys.dtype == values.dtype == k.dtype == v.dtype or offset.ndim != 1:
        return None
    if keys.ndim != 4 or k.ndim != 4 or idx + k.shape[2] > keys.shape[2]:
        return None
    return ext.kv_update(keys, values, offset, k, v, idx)


def sample_tokens(logits: mx.array, params: list[list[float]], u: mx.array) -> mx.array | None:
    """One int32 token per row of float32 logits [B, V] in one op on the CPU: each row's
    (temperature, top_k, top_p, min_p) filter, then the token where the running sum of its
    probabilities (by id) passes u [B] of their sum. None where the extension cannot run it."""
    if not (_fast(logits) and logits.ndim == 2 and _ext is not None):
        return None
    return _ext.sample_tokens(logits, mx.array(params, dtype=mx.float32), u)


def _cpu_ext() -> ModuleType | None:
    """The extension (loaded on first use) when the default device is the CPU, else None."""
    if _ext is None and _reason is None:
        _load()
    return _ext if _ext is not None and mx.default_device() == _CPU else None


def _fast(x: mx.array) -> bool:
    return x.dtype == mx.float32 and _cpu_ext() is not None


def swiglu(gate: mx.array, x: mx.array) -> mx.array | None:
    """silu(gate) * x in one pass with the vectorized exp on the CPU for float32 inputs of one
    shape; None where the extension cannot run it (the caller runs its own ops)."""
    if _fast(gate) and x.dtype == mx.float32 and gate.shape == x.shape and _ext is not None:
        return _ext.swiglu(gate, x)
    return None


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """mx.fast.rms_norm; one pass on the CPU for float32."""
    if _fast(x) and weight.dtype == mx.float32 and _ext is not None:
        return _ext.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def rope(
    x: mx.array, dims: int, traditional: bool, base: float, scale: float, offset: int | mx.array
) -> mx.array:
    """mx.fast.rope (offset an int or per-batch int array); one pass on the CPU for float32
    [B, H, L, D] inputs."""
    if _fast(x) and x.ndim == 4 and _ext is not None:
        off = offset if isinstance(offset, mx.array) else mx.array([offset], dtype=mx.int32)
        if off.size in (1, x.shape[0]):
            return _ext.rope(x, off, dims, traditional, base, scale)
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


def decode_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | str | None,
    flat: bool = False,
) -> mx.array:
    """mx.fast.scaled_dot_product_attention of q [B, Hq, L, D] over k, v [B, Hk, T, D] from a KV
    cache (GQA allowed): a decode step's one position, its drafts being verified, or a prefill
    chunk. One pass per (row, kv head, position) on the CPU for float32 with no mask, MLX's
    "causal" (T >= L) or a boolean key mask [B or 1, 1, L or 1, T] (a batch cache's) or [L, T];
    MLX's SDPA elsewhere. On a short prompt MLX's CPU SDPA spends most of its time in its exp
    (23 ns an element): the kernel took 0.15 ms where SDPA took 3.9 for 82 positions, 29 against
    123 for 512 (one layer of SmolLM2, 2026-11-30, AMD EPYC, loaded machine). With `flat` (one
    query position) the output is [B, 1, Hq * Dv], what an output projection reads: the kernel
    writes that shape itself (no reshape node)."""
    L = q.shape[2] if q.ndim == 4 else 0
    if isinstance(mask, str) and mask == "causal" and L == 1:
        mask = None  # one query position: the last one sees every key
    if _fast(q) and k.dtype == v.dtype == mx.float32 and L >= 1 and _ext is not None:
        if isinstance(mask, mx.array) and mask.ndim == 2:
            mask = mask[None, None]  # mlx-lm's [L, T] mask of one unpadded row (a window's)
        causal = isinstance(mask, str) and mask == "causal" and k.shape[2] >= L
        ok_mask = (
            mask is None
            or causal
            or (
                isinstance(mask, mx.array)
                and mask.dtype == mx.bool_
                and mask.ndim == 4
                and mask.shape[0] in (1, q.shape[0])
                and mask.shape[1] == 1
                and mask.shape[2] in (1, L)
                and mask.shape[3] == k.shape[2]
            )
        )
        if ok_mask and q.shape[1] % k.shape[1] == 0 and k.shape[2] > 0:
            keys = None if causal else mask
            return _ext.decode_attention(q, k, v, keys, scale, causal, flat and L == 1)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return out.reshape(q.shape[0], 1, -1) if flat and L == 1 else out
