"""Decoder layers whose decode step is one kernel op, or four around the KV cache's own update.

With every op of a layer on mlxd's kernels, a SmolLM2 decode step was still ~20 graph nodes per
layer (RMSNorm, three projections, three reshapes, two RoPEs, the cache's update, attention,
o_proj, two residual adds, RMSNorm, MLP), each paying MLX's dispatch and Python's graph building:
at one row that overhead outweighed the matmuls. `FusedBlock` takes over an mlx-lm decoder layer
of the llama / qwen2 / qwen3 shape (same children, same parameters; public `update_modules`)
and runs one query position per row as

    q, k, v = attn_in(x)                 RMSNorm, q/k/v projections (qwen2's biases), qwen3's
                                         per-head q/k RMSNorms, RoPE (kernels/layer.cpp)
    k, v = cache.update_and_fetch(k, v)  the cache's own update, as mlx-lm's layers call it
    h = x + o_proj(attention(q, k, v))   decode attention, then the projection with the add
    out = h + mlp(rms_norm(h))           the MLP with its norm and residual add

with the arithmetic of the unfused kernels, so it gives their bits. A cache that offers
`decode_slot()` and `adopt_slot(...)` (mlxd's batch cache: engine/speculative.py) hands over its
buffers, offset and write position and takes the op's results: then the whole sequence above is
one op (qkernels.decoder_stack over this layer's LayerPlan), ~5x fewer graph nodes and kernel
calls a step (models/fused_stack.py runs a model's whole stack of them as one). Prefill, other
devices and layers the kernels cannot take run the layer's own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import is_
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2, qwen3

from models import qkernels
from models.fused_attention import FusedAttention
from models.fused_layers import FastRMSNorm, FastRoPE
from models.fused_mlp import FusedMLP
from models.quant_layers import CpuQuantizedLinear
from models.swap import swap_modules

# Blocks whose __call__ is `h = x + attn(norm1(x)); return h + mlp(norm2(h))` (mlx-lm 0.32).
SUPPORTED: tuple[type[nn.Module], ...] = (
    llama.TransformerBlock,
    qwen2.TransformerBlock,
    qwen3.TransformerBlock,
)
_QKV = ("q_proj", "k_proj", "v_proj")  # qwen2's carry biases
_ATTN_PROJ = (*_QKV, "o_proj")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_ARRAYS = ("weight", "scales", "biases", "bias")


class FusedBlock(nn.Module):
    """An mlx-lm decoder layer (see SUPPORTED) whose decode step runs on the fused kernels."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for key, value in vars(block).items():  # hidden size, args, ...
            if not key.startswith("_"):
                setattr(self, key, value)
        for name, child in block.children().items():
            setattr(self, name, child)
        self._plan_cache: _Plan | None = None

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if x.shape[1] == 1 and cache is not None and not hasattr(cache, "bits"):
            out = self._decode(x, mask, cache)
            if out is not None:
                return out
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _plan(self) -> Any | None:
        """The one-op decode's LayerPlan (qkernels.layer_plan), made again when a module or
        array it was made of has been replaced since (weights loaded, a projection sharded)."""
        c = self._plan_cache
        if c is not None and all(map(is_, map(dict.get, c.parents, c.keys), c.held)):
            return c.plan
        self._plan_cache = c = _make_plan(self)
        return c.plan

    def _decode(self, x: mx.array, mask: Any, cache: Any) -> mx.array | None:
        # Children and parameters read from the modules' dicts: nn.Module's __getattr__ costs
        # ~0.3 us a lookup, and a step makes ~30 per layer.
        slot: Any = getattr(cache, "decode_slot", None)
        plan = self._plan() if slot is not None else None
        if plan is not None and (kv := slot()) is not None:
            one = qkernels.decoder_stack([plan], x, [kv[0]], [kv[1]], kv[2], kv[3], mask)
            if one is not None:
                cache.adopt_slot(one[2], one[3], one[1])
                return one[0]
        attn, mlp = self["self_attn"], self["mlp"]
        projs = _projections(attn, mlp)
        if projs is None:
            return None
        rope, n1, n2 = attn["rope"], self["input_layernorm"], self["post_attention_layernorm"]
        qk_norm = (attn["q_norm"]["weight"], attn["k_norm"]["weight"]) if "q_norm" in attn else None
        q, k, v, o, gate, up, down = projs
        qkv = qkernels.attn_in(
            x,
            (n1["weight"], n1.eps),
            q,
            k,
            v,
            cache.offset,
            (attn.n_heads, attn.n_kv_heads),
            (rope.dims, rope.traditional, rope.base, rope.scale),
            qk_norm,
            _qkv_bias(attn),
        )
        if qkv is None:
            return None
        keys, values = cache.update_and_fetch(qkv[1], qkv[2])
        out = qkernels.decode_attention(qkv[0], keys, values, attn.scale, mask, flat=True)
        h = qkernels.qmm_add(out, o, x)
        y = qkernels.mlp_residual(h, (n2["weight"], n2.eps), gate, up, down)
        return y if y is not None else h + mlp(n2(h))


@dataclass
class _Plan:
    plan: Any  # qkernels.layer_plan's
    parents: list[dict]  # parents[i][keys[i]] held held[i] for all the plan was made of
    keys: list[str]
    held: list[Any]


def _make_plan(block: FusedBlock) -> _Plan:
    """The block's plan (None where the kernels cannot take it, remembered all the same: the
    check that nothing changed is cheaper than trying again) and what it was made of."""
    attn, mlp = block["self_attn"], block["mlp"]
    qk = ("q_norm", "k_norm") if "q_norm" in attn else ()
    made = _Plan(None, [], [], [])
    for parent, names in (
        (block, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
        (attn, (*_ATTN_PROJ, "rope", *qk)),
        (mlp, _MLP_PROJ),
    ):
        for name in names:
            child = parent[name]
            for p, k in ((parent, name), *((child, k) for k in _ARRAYS if k in child)):
                made.parents.append(p)
                made.keys.append(k)
                made.held.append(p[k])
    projs = _projections(attn, mlp)
    if projs is not None:
        rope, n1, n2 = attn["rope"], block["input_layernorm"], block["post_attention_layernorm"]
        norms = ((n1["weight"], n1.eps), (n2["weight"], n2.eps))
        spec = (attn.n_heads, attn.scale, (rope.dims, rope.traditional, rope.base, rope.scale))
        qk_norm = (attn["q_norm"]["weight"], attn["k_norm"]["weight"]) if qk else None
        made.plan = qkernels.layer_plan(norms, projs, spec, qk_norm, _qkv_bias(attn))
    return made


def _projections(attn: nn.Module, mlp: nn.Module) -> list[qkernels.Packed] | None:
    """q, k, v, o, gate, up, down as kernel arrays while every one is still a kernel layer
    (tensor-parallel sharding swaps them after loading), biases on q, k and v only and on all
    three or none, and q/k/v, gate/up share bits; else None."""
    out = []
    for parent, names in ((attn, _ATTN_PROJ), (mlp, _MLP_PROJ)):
        for name in names:
            p = parent[name]
            if type(p) is not CpuQuantizedLinear or ("bias" in p and name not in _QKV):
                return None
            out.append((p["weight"], p["scales"], p["biases"], p.bits))
    if not out[0][3] == out[1][3] == out[2][3] or out[4][3] != out[5][3]:
        return None
    if sum("bias" in attn[name] for name in _QKV) not in (0, len(_QKV)):
        return None
    return out


def _qkv_bias(attn: nn.Module) -> tuple[mx.array, mx.array, mx.array] | None:
    if "bias" not in attn["q_proj"]:
        return None
    return attn["q_proj"]["bias"], attn["k_proj"]["bias"], attn["v_proj"]["bias"]


def _fusable(m: nn.Module) -> bool:
    if type(m) not in SUPPORTED:
        return False
    attn = m.children().get("self_attn")
    return (
        type(attn) is FusedAttention
        and _qk_norms_fusable(attn, m.children().get("input_layernorm"))
        and type(attn.get("rope")) is FastRoPE
        and type(m.children().get("mlp")) is FusedMLP
        and type(m.children().get("input_layernorm")) is FastRMSNorm
        and type(m.children().get("post_attention_layernorm")) is FastRMSNorm
        and _projections(attn, m.children()["mlp"]) is not None
    )


def _qk_norms_fusable(attn: nn.Module, norm: Any) -> bool:
    """No per-head q/k norms, or qwen3's: FastRMSNorms at the input norm's eps (attn_in takes
    one eps per layer and runs them as FastRMSNorm's kernel does)."""
    if "q_norm" not in attn:
        return True
    qn, kn = attn["q_norm"], attn["k_norm"]
    return (
        type(qn) is FastRMSNorm
        and type(kn) is FastRMSNorm
        and type(norm) is FastRMSNorm
        and qn.eps == kn.eps == norm.eps
    )


def fuse_blocks(model: nn.Module) -> int:
    """Swap decoder layers whose parts all run on the kernels for FusedBlock; returns how many."""
    return swap_modules(model, lambda m: FusedBlock(m) if _fusable(m) else None)
