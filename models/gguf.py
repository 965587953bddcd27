"""Import a GGUF file as an MLX / Hugging Face model folder.

Q4_0 / Q4_1 / Q8_0 tensors stay quantized as MLX affine triples (weight, scales, biases; group 32),
read with `mx.load`, which maps them exactly. Files holding any other quantized type (k-quants,
Q5_0, ...) are dequantized tensor by tensor with the `gguf` package and stored as float16 (bfloat16
when a tensor overflows float16). llama-arch Q/K rows are un-permuted (llama.cpp permutes them for
its interleaved RoPE) and gemma's (1 + w) norms are stored as w, so mlx-lm's models read them as is.
Everything is written to a temporary folder renamed into place at the end: a failed import leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from models.errors import ImportFailedError
from models.gguf_config import ArchSpec, arch_spec, hf_name, qk_heads
from models.gguf_tokenizer import write_tokenizer

log = logging.getLogger("mlxd.gguf")

Progress = Callable[[int, int, str], None]  # (done, total, what)

MLX_QUANT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
FLOAT_TYPES = {"F32", "F16", "BF16"}
GROUP_SIZE = 32
_F16_MAX = float(np.finfo(np.float16).max)


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (rows of weight, scales, biases or bias alike)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise anything
        raise ImportFailedError(f"not a readable GGUF file ({type(e).__name__})") from None


def _metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            continue  # large arrays; the tokenizer reads them itself
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - an odd field we don't need
            continue
    return meta


def _float_array(values: np.ndarray) -> mx.array:
    """float16 when every value fits, else bfloat16 (gemma's embeddings can exceed f16's range)."""
    if np.isfinite(values).all() and np.abs(values).max(initial=0.0) < _F16_MAX:
        return mx.array(values.astype(np.float16))
    return mx.array(values.astype(np.float32)).astype(mx.bfloat16)


def _dequantized(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _fix(spec: ArchSpec, gguf_name: str, arr: mx.array) -> mx.array:
    if (heads := qk_heads(spec, gguf_name)) is not None:
        arr = unpermute_rows(arr, heads)
    if spec.norm_minus_one and gguf_name.endswith("norm.weight"):
        arr = arr.astype(mx.float32) - 1.0
    return arr


def _convert_tensors(
    reader: Any, path: Path, spec: ArchSpec, progress: Progress | None
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """All tensors under HF names, and the per-layer quantization map (empty when none is kept)."""
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    keep_quant = set(types.values()) <= (set(MLX_QUANT_TYPES) | FLOAT_TYPES)
    loaded: dict[str, mx.array] = {}
    if keep_quant and any(t in MLX_QUANT_TYPES for t in types.values()):
        try:
            loaded = mx.load(str(path))  # type: ignore[assignment]
        except Exception as e:  # noqa: BLE001
            raise ImportFailedError(f"cannot read the GGUF tensors ({type(e).__name__})") from None
    out: dict[str, mx.array] = {}
    quant: dict[str, Any] = {}
    total = len(reader.tensors)
    for i, tensor in enumerate(reader.tensors):
        name, kind = tensor.name, types[tensor.name]
        target = hf_name(spec.arch, name)
        if target is None:
            log.debug("skipping GGUF tensor %s", name)
        elif kind in MLX_QUANT_TYPES and keep_quant:
            base, module = name[: -len(".weight")], target[: -len(".weight")]
            for part in ("weight", "scales", "biases"):
                out[f"{module}.{part}"] = _fix(spec, name, loaded.pop(f"{base}.{part}"))
            quant[module] = {"group_size": GROUP_SIZE, "bits": MLX_QUANT_TYPES[kind]}
        elif kind in FLOAT_TYPES and kind != "F16":
            arr = loaded.pop(name, None)
            src = arr if arr is not None else mx.array(_dequantized(tensor))
            out[target] = _fix(spec, name, src.astype(mx.float32))
        else:
            values = _dequantized(tensor)
            out[target] = _fix(spec, name, _float_array(values))
        if target is not None:
            mx.eval(*(v for k, v in out.items() if k.startswith(target.rsplit(".", 1)[0])))
        if progress is not None:
            progress(i + 1, total, name)
    if spec.config.get("tie_word_embeddings") is False and "lm_head.weight" not in out:
        raise ImportFailedError("the GGUF file has no output weights")
    return out, quant


def _quant_config(quant: dict[str, Any]) -> dict[str, Any] | None:
    if not quant:
        return None
    bits = [q["bits"] for q in quant.values()]
    common = max(set(bits), key=bits.count)
    cfg: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common}
    cfg.update({k: v for k, v in quant.items() if v["bits"] != common})
    return cfg


def _main_dtype(tensors: dict[str, mx.array]) -> str:
    sizes: dict[str, int] = {}
    for arr in tensors.values():
        key = str(arr.dtype).rsplit(".", 1)[-1]
        sizes[key] = sizes.get(key, 0) + arr.size
    return max(sizes, key=lambda k: sizes[k]) if sizes else "float16"


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = True


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a GGUF file is imported. Its reader builds hundreds of
    thousands of small numpy views (a few per vocabulary string): as the heap grows, full
    collections of 0.1-0.2 s run, holding the GIL, and every stream stalls. Reference counting
    frees the reader's objects; any cycle left is collected once collection resumes."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def import_gguf(
    gguf_path: str | Path, dest_dir: str | Path, progress: Progress | None = None
) -> dict:
    """Convert a GGUF file into an MLX model folder at dest_dir (which must not exist yet).

    Returns the written config.json as a dict. Raises ImportFailedError (unsupported architecture,
    unreadable file, missing tensors); on failure nothing is left at dest_dir.
    """
    src, dest = Path(gguf_path), Path(dest_dir)
    if not src.is_file():
        raise ImportFailedError("the GGUF file does not exist")
    if dest.exists():
        raise ImportFailedError("a model with that name already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
    try:
        with _gc_paused():
            return _import(src, dest, tmp, progress)
    except ImportFailedError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001 - a bug or odd file: one clear message, no traceback
        shutil.rmtree(tmp, ignore_errors=True)
        log.debug("GGUF import failed", exc_info=True)
        raise ImportFailedError(f"GGUF import failed ({type(e).__name__}: {e})") from None


def _import(src: Path, dest: Path, tmp: Path, progress: Progress | None) -> dict:
    reader = _read_gguf(src)
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    spec = arch_spec(meta, names, len(tokens.data) if tokens is not None else 0)
    special = write_tokenizer(reader, spec.arch, tmp)
    tensors, quant = _convert_tensors(reader, src, spec, progress)
    config = dict(spec.config)
    if (qcfg := _quant_config(quant)) is not None:
        config["quantization"] = qcfg
        config["quantization_config"] = qcfg
    else:
        config["torch_dtype"] = _main_dtype(tensors)
    config.update({k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id")})
    config["mlxd"] = {"source": "gguf", "gguf_file_type": meta.get("general.file_type")}
    mx.save_safetensors(str(tmp / "model.safetensors"), tensors, metadata={"format": "mlx"})
    del tensors
    _write_json(tmp / "config.json", config)
    gen = {
        k: v for k, v in special.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    _write_json(tmp / "generation_config.json", gen)
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(dest)
    return config
