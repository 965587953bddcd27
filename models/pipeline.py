"""Pipeline-parallel split of a loaded decoder over an `mx.distributed` group.

Each rank keeps a contiguous, balanced slice of the model's `layers` and drops the others'
weights. Rank 0 also keeps the token embedding, the final norm and the lm_head (with tied
embeddings that is one matrix, held once); ranks 1..N-1 keep layers only. A forward pass:

    rank 0:    embed -> its layers -> send to 1 ............ recv from N-1 -> norm -> lm_head
    rank r>0:  recv from r-1 -> its layers -> send to r+1 (the last rank: back to rank 0)

The last rank sends the final hidden state [B, L, D] back, not logits: logits are [B, L, V]
(85x larger for SmolLM2), and rank 0 needs the embedding for the input tokens anyway. mlx-lm's
own pipeline runs the layers in reverse rank order to save that hop, but then both end ranks
need the (tied) embedding matrix and every rank computes the logits; here only rank 0 samples.

The model's own forward runs unchanged on every rank (masks come from each rank's own caches,
which see the same joins, leaves and padding): the recv wraps the rank's first layer, the send
takes the place of the final norm, and a weightless stand-in replaces what a rank dropped (its
embedding yields zeros of the right shape, its lm_head zero logits: other ranks never sample).

MLX's send/recv are lazy graph ops, and what the caller evaluates differs by rank (a KV-only
prefill never reads rank 0's logits), so each rank evaluates its sends and recvs inside the
forward, in the order above. Every rank then performs the same sequence of transfers per
forward call, whatever it evaluates afterwards, and no rank waits on a transfer another rank
has not queued. The ranks must call the model in lockstep with the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from models.sharding import ShardingError, resident_weight_bytes

_EMBEDDINGS = ("embed_tokens", "wte", "tok_embeddings")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f")


class PipelineError(ShardingError):
    """A model or split that pipeline parallelism cannot serve; says why."""


@dataclass(frozen=True)
class PipelineStage:
    """What one rank holds after the split."""

    rank: int
    size: int
    layers: range  # indices into the model's full layer list
    num_layers: int  # of the whole model
    holds_embedding: bool  # the token embedding, final norm and lm_head: rank 0 only
    weight_bytes: int  # parameters this rank holds after the split


def split_layers(num_layers: int, size: int) -> list[range]:
    """Each rank's contiguous slice of the layers, in rank order, sizes differing by at most one.
    The larger slices go to the last ranks: rank 0 also holds the embedding and the lm_head."""
    check_split(num_layers, size)
    base, extra = divmod(num_layers, size)
    sizes = [base + (1 if r >= size - extra else 0) for r in range(size)]
    starts = [sum(sizes[:r]) for r in range(size)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def check_split(num_layers: int, size: int) -> None:
    """Raise PipelineError unless `num_layers` layers can be split over `size` ranks."""
    if size < 2:
        raise PipelineError(
            f"pipeline parallelism needs at least 2 ranks, the group has {size}: "
            "start every rank under mlx.launch (e.g. `mlx.launch -n 2 ...`)"
        )
    if num_layers < size:
        raise PipelineError(
            f"{num_layers} layers cannot be split over {size} ranks (each rank needs at least "
            f"one layer); use at most {num_layers} ranks"
        )


def check_config_pipeline(config: dict[str, Any], size: int) -> None:
    """The layer-count check from a model's config.json, before any weight is read."""
    cfg = config.get("text_config", config)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    if layers <= 0:
        raise PipelineError("the model's config names no layer count (num_hidden_layers)")
    check_split(layers, size)


def pipeline_split(model: nn.Module, group: Any) -> PipelineStage:
    """Split a loaded `model` in place for this rank of `group`, freeing the other ranks'
    weights (PipelineSplit's two steps at once; PipelineError says why a split cannot work)."""
    split = PipelineSplit(group)
    split.cut(model)
    return split.finish(model)


class PipelineSplit:
    """One rank's split in two steps, so a rank need never read the other ranks' layers:
    `cut` keeps this rank's layers of the model as built, before any weight is read (the
    loader's `prepare` hook); `finish`, once loaded, installs the transfers and drops what only
    rank 0 keeps (the embedding is kept until then: the hidden state's dtype is the loaded
    embedding's, which the CPU weight format may change)."""

    def __init__(self, group: Any):
        self.group = group
        self.size, self.rank = group.size(), group.rank()
        self.layers = range(0)
        self.num_layers = 0
        self._ends = ("", "")

    def cut(self, model: nn.Module) -> None:
        """Keep this rank's slice of `model`'s layers. Raises PipelineError (before changing
        anything) for a group of one rank, fewer layers than ranks, a model without a `layers`
        list, embedding or final norm, or layers whose caches differ (sliding-window and global
        attention mixed: the model's forward picks masks by layer position, which a slice
        would shift)."""
        arch = str(getattr(model, "model_type", "") or type(model).__name__)
        inner = _decoder(model)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, list) or not layers:
            raise PipelineError(f"architecture '{arch}' has no `layers` list to split over ranks")
        check_split(len(layers), self.size)
        embed = _child(inner, _EMBEDDINGS, "token embedding")
        norm = _child(inner, _FINAL_NORMS, "final norm")
        kinds = {type(c).__name__ for c in make_prompt_cache(model)}
        if len(kinds) > 1:
            raise PipelineError(
                f"architecture '{arch}' mixes layer kinds ({', '.join(sorted(kinds))} caches): "
                "pipeline parallelism supports models whose layers are all alike"
            )
        self.num_layers, self._ends = len(layers), (embed, norm)
        self.layers = split_layers(self.num_layers, self.size)[self.rank]
        inner.layers = layers[self.layers.start : self.layers.stop]

    def finish(self, model: nn.Module) -> PipelineStage:
        """Install the transfers on the cut model and drop what this rank does not hold."""
        assert self.num_layers, "cut() first"
        inner, (embed, norm) = _decoder(model), self._ends
        # Shapes of the hidden state and the logits, from the lazy graph of a one-token
        # forward (nothing is computed).
        probe = mx.zeros((1, 1), dtype=mx.int32)
        hidden, logits = _Shape.of(getattr(inner, embed)(probe)), _Shape.of(model(probe))
        group, rank, last = self.group, self.rank, self.size - 1
        if rank == 0:
            setattr(inner, norm, _Relay(getattr(inner, norm), group, last, hidden.dtype))
        else:
            own = list(inner.layers)
            own[0] = _Receive(own[0], rank - 1, group)
            inner.layers = own
            setattr(inner, embed, _NoEmbedding(hidden, logits))
            setattr(inner, norm, _Send((rank + 1) % self.size, group, hidden.dtype))
            if "lm_head" in model:
                model.lm_head = _NoHead(logits)
        mx.clear_cache()  # the dropped weights' buffers go back to the system
        return PipelineStage(
            rank=rank,
            size=self.size,
            layers=self.layers,
            num_layers=self.num_layers,
            holds_embedding=rank == 0,
            weight_bytes=resident_weight_bytes(model),
        )


def describe_pipeline(num_layers: int, size: int) -> str:
    """What each rank holds, in words (for logs and /api/ps)."""
    parts = [
        f"rank {r}: {'embedding, lm_head, ' if r == 0 else ''}layers {p.start}-{p.stop - 1}"
        for r, p in enumerate(split_layers(num_layers, size))
    ]
    return f"pipeline parallel over {size} ranks; " + "; ".join(parts)


def _decoder(model: nn.Module) -> Any:
    return getattr(model, "model", model)  # llama-style: the decoder under `.model`


def _child(inner: nn.Module, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if name in inner:
            return name
    raise PipelineError(f"the model has no {what} ({' / '.join(names)}) where the split needs one")


class _Receive(nn.Module):
    """A rank's first layer, fed the previous rank's hidden state instead of its own input."""

    def __init__(self, layer: nn.Module, src: int, group: Any):
        super().__init__()
        self.layer = layer
        self.src, self.group = src, group

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        h = mx.distributed.recv_like(x, self.src, group=self.group)
        return self.layer(h, *args, **kwargs)

    def __getattr__(self, key: str) -> Any:
        # The model reads attributes of its layers (e.g. llama's `use_sliding` in make_cache).
        if key in self:
            return self[key]
        layer = self.get("layer")
        if layer is None:
            raise AttributeError(key)
        return getattr(layer, key)


def _send_now(h: mx.array, dst: int, group: Any, wire: mx.Dtype) -> None:
    # On the wire in the embedding's dtype, which every rank knows: what a rank receives is
    # what was sent even if a layer promoted the hidden state's dtype (none of those here do).
    mx.eval(mx.distributed.send(h.astype(wire), dst, group=group))


class _Send(nn.Module):
    """In place of the final norm on ranks 1..N-1: send the hidden state on, now."""

    def __init__(self, dst: int, group: Any, wire: mx.Dtype):
        super().__init__()
        self.dst, self.group, self.wire = dst, group, wire

    def __call__(self, h: mx.array) -> mx.array:
        _send_now(h, self.dst, self.group, self.wire)
        return h


class _Relay(nn.Module):
    """The final norm on rank 0: send its layers' output to rank 1, take the last rank's back."""

    def __init__(self, norm: nn.Module, group: Any, last: int, wire: mx.Dtype):
        super().__init__()
        self.norm = norm
        self.group, self.last, self.wire = group, last, wire

    def __call__(self, h: mx.array) -> mx.array:
        # Two evaluations: a recv has no inputs, so one graph could not order it after the send.
        _send_now(h, 1, self.group, self.wire)
        back = mx.distributed.recv(h.shape, self.wire, self.last, group=self.group)
        mx.eval(back)
        return self.norm(back)


@dataclass(frozen=True)
class _Shape:
    width: int  # the last axis
    dtype: mx.Dtype

    @staticmethod
    def of(x: mx.array) -> _Shape:
        return _Shape(int(x.shape[-1]), x.dtype)


class _NoHead(nn.Module):
    """A weightless stand-in for the lm_head a rank does not hold: zero logits."""

    def __init__(self, logits: _Shape):
        super().__init__()
        self.logits = logits

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros((*x.shape[:-1], self.logits.width), dtype=self.logits.dtype)


class _NoEmbedding(_NoHead):
    """A weightless stand-in for the embedding a rank does not hold: a zero hidden state of
    the right shape (the first layer replaces it with the one received), zero tied logits."""

    def __init__(self, hidden: _Shape, logits: _Shape):
        super().__init__(logits)
        self.hidden = hidden

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros((*x.shape, self.hidden.width), dtype=self.hidden.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return super().__call__(x)
