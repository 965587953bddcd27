"""A model folder's files read without MLX: safetensors headers and config.json facts.

Discovery (listing models) uses only this, so listing never imports MLX; the loader uses it too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file whose header or length is wrong."""


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's length (truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError("file too short")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError("bad header length")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise SafetensorsError("header is not JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a table")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise SafetensorsError("file is truncated or has trailing bytes")
    return header


def weight_files(path: Path) -> list[Path]:
    """The model's safetensors shards (model*.safetensors, as mlx-lm loads them)."""
    return sorted(path.glob("model*.safetensors"))


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it as text_config)."""
    return config.get("text_config", config) if "num_hidden_layers" not in config else config


def context_length(config: dict[str, Any]) -> int:
    cfg = text_config(config)
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return 4096


def sliding_window(config: dict[str, Any]) -> int | None:
    """The local attention window when some layers use one (gemma2/3), else None."""
    cfg = text_config(config)
    window = cfg.get("sliding_window")
    uses = cfg.get("use_sliding_window", str(cfg.get("model_type", "")).startswith("gemma"))
    return int(window) if isinstance(window, int) and window > 0 and uses else None
