"""Gemma 3's decoder layer with its decode step on the fused kernels (as fused_block.py does for
the llama shape).

Gemma's layer differs from llama's by four norms of the form x * rsqrt(mean(x^2) + eps) * (1 + w)
(pre/post attention, pre/post feedforward), per-head q/k norms of that form, and a GELU-tanh MLP:

    h = x + post_attn_norm(attn(input_norm(x)))
    out = h + post_ff_norm(mlp(pre_ff_norm(h)))

`FusedGemmaBlock` runs one query position per row as the same four kernel ops around the cache's
own update_and_fetch, with the options kernels/layer.cpp, qmm.cpp and mlp.cpp take for it (q/k
norms in attn_in, a norm before qmm_add's add, GELU-tanh and a post norm in mlp_residual).
Sliding-window layers keep their rotating caches: the mask the model builds is passed through.
The norms' (1 + w) weights are computed once and recomputed whenever a norm's weight array is
replaced. Prefill, other devices and float16 activations run gemma's own sequence.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma3_text

from models import qkernels
from models.fused_attention import FusedAttention
from models.fused_block import _projections
from models.fused_layers import FastRoPE
from models.swap import swap_modules

# The block's norms in the order the kernels take them: input, post-attention, pre- and
# post-feedforward, then the attention layer's q and k norms.
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


class FusedGemmaBlock(nn.Module):
    """A gemma3_text.TransformerBlock whose decode step runs on the fused kernels."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for key, value in vars(block).items():
            if not key.startswith("_"):
                setattr(self, key, value)
        for name, child in block.children().items():
            setattr(self, name, child)
        # A plain attribute (not a module parameter): ((the norms' weight arrays), (1 + w each)).
        object.__setattr__(self, "_offset_norms", ((), ()))

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if x.shape[1] == 1 and cache is not None and not hasattr(cache, "bits"):
            out = self._decode(x, mask, cache)
            if out is not None:
                return out
        r = self.self_attn(self.input_layernorm(x), mask, cache)
        h = gemma3_text.clip_residual(x, self.post_attention_layernorm(r))
        r = self.mlp(self.pre_feedforward_layernorm(h))
        return gemma3_text.clip_residual(h, self.post_feedforward_layernorm(r))

    def _norm_weights(self, attn: nn.Module) -> tuple[mx.array, ...]:
        """(1 + w) in float32 for the six norms, as gemma's RMSNorm computes it each call."""
        ws = tuple(self[n]["weight"] for n in _NORMS) + (
            attn["q_norm"]["weight"],
            attn["k_norm"]["weight"],
        )
        src, offset = self._offset_norms
        if len(src) != len(ws) or any(a is not b for a, b in zip(src, ws, strict=True)):
            offset = tuple((1.0 + w).astype(mx.float32) for w in ws)
            object.__setattr__(self, "_offset_norms", (ws, offset))
        return offset

    def _decode(self, x: mx.array, mask: Any, cache: Any) -> mx.array | None:
        attn, mlp = self["self_attn"], self["mlp"]
        projs = _projections(attn, mlp)
        if projs is None:
            return None
        q, k, v, o, gate, up, down = projs
        rope, eps = attn["rope"], self["input_layernorm"].eps
        w_in, w_post_attn, w_pre_ff, w_post_ff, w_q, w_k = self._norm_weights(attn)
        qkv = qkernels.attn_in(
            x,
            (w_in, eps),
            q,
            k,
            v,
            cache.offset,
            (attn.n_heads, attn.n_kv_heads),
            (rope.dims, rope.traditional, rope.base, rope.scale),
            qk_norm=(w_q, w_k),
        )
        if qkv is None:
            return None
        keys, values = cache.update_and_fetch(qkv[1], qkv[2])
        out = qkernels.decode_attention(qkv[0], keys, values, attn.scale, mask)
        h = qkernels.qmm_add(out.reshape(x.shape[0], 1, -1), o, x, norm=(w_post_attn, eps))
        y = qkernels.mlp_residual(h, (w_pre_ff, eps), gate, up, down, True, w_post_ff)
        if y is None:
            y = h + self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(h)))
        return y


def _fusable(m: nn.Module) -> bool:
    if type(m) is not gemma3_text.TransformerBlock:
        return False
    attn, mlp = m.children().get("self_attn"), m.children().get("mlp")
    if type(attn) is not FusedAttention or type(attn.get("rope")) is not FastRoPE:
        return False
    norms = [m.children().get(n) for n in _NORMS] + [attn.get("q_norm"), attn.get("k_norm")]
    return (
        type(mlp) is gemma3_text.MLP
        and all(type(n) is gemma3_text.RMSNorm for n in norms)
        and len({n.eps for n in norms}) == 1  # the kernels take one eps per layer
        and _projections(attn, mlp) is not None
    )


def fuse_gemma_blocks(model: nn.Module) -> int:
    """Swap gemma3 decoder layers whose projections run on the kernels for FusedGemmaBlock;
    returns how many."""
    return swap_modules(model, lambda m: FusedGemmaBlock(m) if _fusable(m) else None)
