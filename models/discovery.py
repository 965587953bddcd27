"""Find models on disk and describe them from config.json and safetensors headers (no weights read)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import InvalidModelNameError
from models.files import SafetensorsError, context_length, read_safetensors_header, weight_files
from models.names import folder_to_name, parse_name


@dataclass
class ModelEntry:
    """A model folder as found on disk."""

    name: str  # canonical family:tag
    path: Path
    architecture: str
    parameters: int
    quantization: str  # "4-bit, group 32", "float16", ...
    bits: int | None
    group_size: int | None
    dtype: str  # dtype of the unquantized tensors (e.g. "float16")
    context_length: int
    size_bytes: int
    modified_at: float
    digest: str
    family: str
    config: dict[str, Any]


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _count(header: dict[str, Any], bits: int | None) -> tuple[int, str]:
    """Parameters in one shard (quantized weights counted unpacked) and its main float dtype."""
    params = 0
    dtypes: dict[str, int] = {}
    for key, t in header.items():
        if key == "__metadata__" or key.endswith((".scales", ".biases")):
            continue
        n = math.prod(t["shape"])
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if t["dtype"] == "U32" and base and f"{base}.scales" in header:
            n *= 32 // (bits or 4)
        else:
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + n
        params += n
    main = max(dtypes, key=lambda k: dtypes[k]) if dtypes else ""
    return params, _DTYPE_NAMES.get(main, main.lower())


def describe(path: Path, name: str) -> ModelEntry | None:
    """The entry of one model folder, or None when it is not a loadable-looking model."""
    try:
        raw_config = (path / "config.json").read_bytes()
        config = json.loads(raw_config)
    except (OSError, ValueError):
        return None
    files = weight_files(path)
    if not isinstance(config, dict) or not files:
        return None
    q = config.get("quantization") or {}
    bits, group = q.get("bits"), q.get("group_size")
    digest = hashlib.sha256(raw_config)
    params, dtype, size = 0, "", 0
    for f in files:
        try:
            header = read_safetensors_header(f)
        except (OSError, SafetensorsError):
            header = {}  # listed (so the user sees it); loading reports the corruption
        digest.update(json.dumps(header, sort_keys=True).encode())
        n, dtype = _count(header, bits)
        params += n
        size += f.stat().st_size
    for extra in path.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors":
            size += extra.stat().st_size
    family, _ = parse_name(name)
    return ModelEntry(
        name=name,
        path=path,
        architecture=str(config.get("model_type", "unknown")),
        parameters=params,
        quantization=f"{bits}-bit, group {group}" if bits else (dtype or "unknown"),
        bits=bits,
        group_size=group,
        dtype=dtype,
        context_length=context_length(config),
        size_bytes=size,
        modified_at=max(f.stat().st_mtime for f in files),
        digest="sha256:" + digest.hexdigest(),
        family=family,
        config=config,
    )


def scan(models_dir: Path) -> dict[str, ModelEntry]:
    """Every model folder directly inside models_dir, by canonical name. Hidden and temporary
    folders, invalid names and symlinks leaving the dir are skipped."""
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        return {}
    root = root.resolve()
    out: dict[str, ModelEntry] = {}
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if child.is_symlink() and root not in child.resolve().parents:
            continue
        try:
            name = folder_to_name(child.name)
        except InvalidModelNameError:
            continue
        family, tag = parse_name(name)
        entry = describe(child, f"{family}:{tag}")
        if entry is not None:
            out[entry.name] = entry
    return out
