"""A model's whole decoder stack as one kernel op at decode.

With every decoder layer one op (fused_block.py), a SmolLM2 decode step still built 30 of them
from Python, each with its plan check, its cache's hand-over and a graph node. `FusedStack`
takes over the decoder body of mlx-lm's llama / qwen2 / qwen3 models (`model.model`: same
children, same parameters; public `update_modules`) and, for a decode step whose caches all
offer `decode_slot` (mlxd's batch cache: engine/speculative.py), runs

    h = embed(tokens)
    h, caches = decoder_stack(every layer's plan, h, every cache's buffers, offset, mask)
    out = norm(h)

in one op (qkernels.decoder_stack: each layer as FusedBlock's one-op decode, the same bits).
A verify pass (a row's token and its drafts: engine/speculative.py) runs as that op over its
T positions a row, each computed as a one-token step there would compute it; through the
layers' own sequence it cost ~2.7x a step at T=2 and ~6x at T=8 (SmolLM2, one row), the
drafts' gain with it. As mlx-lm's bodies do with their mask, it reads the rows' positions from
the first layer's cache: one batch, every layer's cache holds the same positions. Anything
else (a prefill into per-sequence caches, BLAS_ROWS rows and more, sliding-window layers,
other caches, other devices) runs the body's own __call__.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.base import create_attention_mask

from models import qkernels
from models.fused_block import FusedBlock
from models.swap import swap_modules

# Bodies whose __call__ is `h = embed(inputs); mask = create_attention_mask(h, cache[0]);
# h = layer(h, mask, c) for each layer; return norm(h)` for full-attention layers (mlx-lm 0.32).
SUPPORTED: tuple[type[nn.Module], ...] = (llama.LlamaModel, qwen2.Qwen2Model, qwen3.Qwen3Model)


class FusedStack(nn.Module):
    """The decode step of an mlx-lm decoder body (see SUPPORTED) as one kernel op: mixed into
    a subclass of the body's own class (fuse_stacks makes one a class), whose __call__ runs
    everything else."""

    def __init__(self, body: nn.Module):
        nn.Module.__init__(self)  # the body's own __init__ builds from args: its parts are copied
        for key, value in vars(body).items():  # args, pipeline rank and size, ...
            if not key.startswith("_"):
                setattr(self, key, value)
        for name, value in body.items():  # children, and lists such as llama's layer_types
            setattr(self, name, value)

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: Any = None):
        if cache is not None and input_embeddings is None and inputs.ndim == 2:
            out = self._decode(inputs, cache)
            if out is not None:
                return out
        return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings)

    def _decode(self, inputs: mx.array, cache: list) -> mx.array | None:
        layers = self["layers"]
        if getattr(self, "pipeline_size", 1) != 1 or len(cache) != len(layers):
            return None
        # Layers wrapped after the swap (a pipeline rank's first layer receives its input from
        # the rank before) must run their wrapper: the stack would skip it.
        if not all(type(layer) is FusedBlock for layer in layers):
            return None
        if not all(getattr(c, "decode_slot", None) for c in cache):
            return None
        plans = [layer._plan() for layer in layers]
        if None in plans:
            return None
        n = inputs.shape[1]
        slots = [c.decode_slot(n) for c in cache]
        if None in slots or len({s[3] for s in slots}) != 1:
            return None
        h = self["embed_tokens"](inputs)
        mask = create_attention_mask(h, cache[0])
        keys, values = [s[0] for s in slots], [s[1] for s in slots]
        out = qkernels.decoder_stack(plans, h, keys, values, slots[0][2], slots[0][3], mask)
        if out is None:
            return None
        for i, c in enumerate(cache):
            c.adopt_slot(out[2 + 2 * i], out[3 + 2 * i], out[1], n)
        return self["norm"](out[0])


def _fusable(m: nn.Module) -> bool:
    if type(m) not in SUPPORTED:
        return False
    layers = m.children().get("layers")
    return (
        isinstance(layers, list)
        and len(layers) > 0
        and all(type(layer) is FusedBlock for layer in layers)
        and not any(getattr(layer, "use_sliding", False) for layer in layers)
    )


# One subclass per supported body class, FusedStack's decode before the class's own __call__.
_CLASSES: dict[type, type] = {b: type(f"Fused{b.__name__}", (FusedStack, b), {}) for b in SUPPORTED}


def fuse_stacks(model: nn.Module) -> int:
    """Swap decoder bodies whose layers are all FusedBlocks for their FusedStack subclass;
    returns how many."""
    return swap_modules(model, lambda m: _CLASSES[type(m)](m) if _fusable(m) else None)
