"""Tensor-parallel sharding of a loaded decoder over an `mx.distributed` group (Megatron style).

Each rank keeps 1/N of every attention head group and MLP column, as mlx-lm's `Model.shard` does:
q/k/v and gate/up are split by output rows ("all-to-sharded"), o_proj and down_proj by input
columns with an `all_sum` after them ("sharded-to-all"). mlx-lm's `shard` works on nn.Linear and
QuantizedLinear only; mlxd's CPU layout swaps in TransposedLinear, so the split is done here, over
each module's [out, in] `weight`, and handed to mlx's own `shard_linear` for the others. The
embedding and the lm_head stay whole on every rank (as in mlx-lm).

`check_split` and `describe_split` serve both splits; the pipeline's is models/pipeline.py.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from models.cpu_layout import TransposedLinear

_COLUMNS = ("q_proj", "k_proj", "v_proj")
_MLP_COLUMNS = ("gate_proj", "up_proj")


class ShardingError(ValueError):
    """A model or split that tensor parallelism cannot serve; says why."""


class SumAcross(nn.Module):
    """A row-split projection: each rank's partial product, summed over the group."""

    def __init__(self, inner: nn.Module, group: Any):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.inner(x), group=self.group)


def layers_of(model: nn.Module) -> list:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ShardingError("the model has no `layers` list to shard")
    return layers


def check_tensor_split(model: nn.Module, n: int) -> None:
    """Raise ShardingError unless every layer's heads and MLP split evenly over n ranks."""
    for i, layer in enumerate(layers_of(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise ShardingError(f"layer {i} has no self_attn/mlp pair: not a llama-style decoder")
        names = [*_COLUMNS, "o_proj"]
        if not all(hasattr(attn, k) for k in names) or not hasattr(attn, "n_kv_heads"):
            raise ShardingError(f"layer {i}'s attention is not q/k/v/o projections")
        if not all(hasattr(mlp, k) for k in (*_MLP_COLUMNS, "down_proj")):
            raise ShardingError(f"layer {i}'s MLP is not gate/up/down projections")
        heads, kv = attn.n_heads, attn.n_kv_heads
        if heads % n or kv % n:
            raise ShardingError(
                f"{heads} query heads and {kv} KV heads do not divide over {n} ranks; "
                f"use a rank count dividing {_gcd(heads, kv)}"
            )
        width = _out_dim(mlp.gate_proj)
        if width % n:
            raise ShardingError(f"the MLP width {width} does not divide over {n} ranks")


def check_config_split(config: dict[str, Any], n: int) -> None:
    """The same check from a model's config.json, before any weight is read."""
    cfg = config.get("text_config", config)
    heads = int(cfg.get("num_attention_heads", 0))
    kv = int(cfg.get("num_key_value_heads") or heads)
    if heads and (heads % n or kv % n):
        raise ShardingError(
            f"{heads} query heads and {kv} KV heads do not divide over {n} ranks; "
            f"use a rank count dividing {_gcd(heads, kv)}"
        )
    width = int(cfg.get("intermediate_size", 0))
    if width % n:
        raise ShardingError(f"the MLP width {width} does not divide over {n} ranks")


SPLITS = ("tensor", "pipeline")


def check_mode(mode: str) -> None:
    """Refuse a split this build cannot make, before any process joins the group."""
    if mode not in SPLITS:
        raise ShardingError(f"unknown split {mode!r}; use one of {', '.join(SPLITS)}")


def check_split(mode: str, config: dict[str, Any], n: int) -> None:
    """Refuse, before any weight is read, a split this model cannot take over n ranks."""
    check_mode(mode)
    if mode == "pipeline":
        from models.pipeline import check_config_pipeline  # it builds on this module

        check_config_pipeline(config, n)
    else:
        check_config_split(config, n)


def describe_split(mode: str, n: int, config: dict[str, Any]) -> str:
    """One line for /api/ps: what each rank holds."""
    if mode == "pipeline":
        from models.pipeline import describe_pipeline

        cfg = config.get("text_config", config)
        return describe_pipeline(int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0), n)
    return f"{mode} parallel over {n} ranks: 1/{n} of every layer's heads and MLP on each rank"


def shard_tensor(model: nn.Module, group: Any) -> None:
    """Shard the model in place for this rank; the full weights are freed (copies are kept)."""
    n, rank = group.size(), group.rank()
    check_tensor_split(model, n)
    for layer in layers_of(model):
        attn, mlp = layer.self_attn, layer.mlp
        for name in _COLUMNS:
            setattr(attn, name, _columns(getattr(attn, name), n, rank, group))
        attn.o_proj = _rows(attn.o_proj, n, rank, group)
        for name in _MLP_COLUMNS:
            setattr(mlp, name, _columns(getattr(mlp, name), n, rank, group))
        mlp.down_proj = _rows(mlp.down_proj, n, rank, group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
    mx.eval(model.parameters())


def _columns(m: nn.Module, n: int, rank: int, group: Any) -> nn.Module:
    if type(m) is TransposedLinear:
        w = m.weight  # [out, in]
        size = w.shape[0] // n
        part = mx.contiguous(w[rank * size : (rank + 1) * size])
        bias = m.get("bias")
        bias = mx.contiguous(bias[rank * size : (rank + 1) * size]) if bias is not None else None
        return TransposedLinear(part, bias)
    return _mlx_shard(m, "all-to-sharded", group)


def _rows(m: nn.Module, n: int, rank: int, group: Any) -> nn.Module:
    if type(m) is TransposedLinear:
        w = m.weight
        size = w.shape[1] // n
        part = mx.contiguous(w[:, rank * size : (rank + 1) * size])
        if m.get("bias") is not None:
            raise ShardingError("row-split projections with a bias are not supported")
        return SumAcross(TransposedLinear(part), group)
    return _mlx_shard(m, "sharded-to-all", group)


def _mlx_shard(m: nn.Module, how: str, group: Any) -> nn.Module:
    if not isinstance(m, nn.Linear | nn.QuantizedLinear):
        raise ShardingError(f"cannot shard a {type(m).__name__} projection")
    return shard_linear(m, how, group=group)


def _out_dim(m: nn.Module) -> int:
    return int(m.weight.shape[0])  # [out, in] in every layout (quantized: packed columns)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds."""
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(model.parameters())
    return sum(int(v.nbytes) for _, v in leaves)
