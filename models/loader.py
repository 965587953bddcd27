"""Load a model folder (config.json, *.safetensors, tokenizer) into an mlx-lm model.

On the CPU backend the weights take the form `weights_on_cpu` names, module by module right after a
lazy load (so peak memory stays near the final size):
- "as_stored": quantized layers the kernels read (GGUF Q4_0 / Q4_1 / Q8_0) stay as stored, other
  matmul weights become 8-bit group-32; all run on mlxd's kernels (models/qkernels.py);
- "q8": every matmul weight becomes 8-bit group-32 and runs on mlxd's kernels;
- "fp32": quantized and half-precision weights become float32 (matmuls go through the fast BLAS).
MLX's own quantized and fp16 CPU kernels are several times slower than fp32, so without mlxd's
kernels (not built) the quantized formats load as fp32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from models import qkernels
from models.cpu_layout import fast_activations, transpose_for_cpu
from models.errors import ModelLoadError
from models.files import (
    SafetensorsError,
    context_length,
    read_safetensors_header,
    sliding_window,
    text_config,
    weight_files,
)
from models.fused_block import fuse_blocks
from models.fused_gemma import fuse_gemma_blocks
from models.fused_layers import fuse_for_cpu
from models.fused_mlp import fuse_mlps
from models.fused_stack import fuse_stacks
from models.memory import (
    backend,
    kv_bytes_per_token,
    prefill_activation_bytes,
    step_activation_bytes,
)
from models.quant_layers import CpuQuantizedEmbedding, quantize_for_cpu
from models.swap import replace_module
from models.tokenizer import Tokenizer

log = logging.getLogger("mlxd.loader")

WEIGHTS_ON_CPU = ("as_stored", "q8", "fp32")


@dataclass
class LoadedModel:
    """A model in memory, ready for the runner."""

    name: str
    path: Path
    model: nn.Module  # model(input_ids[B, L], cache=list_of_caches) -> logits [B, L, V]
    tokenizer: Tokenizer
    config: dict
    architecture: str
    context_length: int
    sliding_window: int | None
    eos_token_ids: set[int]
    weight_bytes: int
    weight_format: str
    kv_dtype_bytes: int = 4
    # Prefills of this many tokens on (0: none) dequantize the weights (models/qkernels.py).
    dequantized_from: int = 0
    vocab_size: int = 0  # token ids a request may use: [0, vocab_size) (see `vocab_size()`)
    extra: dict[str, Any] = field(default_factory=dict)

    def make_cache(self, max_kv_size: int | None = None) -> list:
        """A fresh per-layer KV cache: rotating for sliding-window layers, and for every layer
        when `max_kv_size` caps the KV kept (architectures with their own cache layout keep it)."""
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model, max_kv_size)

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token costs over all layers, in the model's activation dtype."""
        return kv_bytes_per_token(self.config, self.kv_dtype_bytes)

    def step_activation_bytes(self, tokens: int, rows: int) -> int:
        """Bytes a step of `tokens` tokens over `rows` rows allocates and frees (models/memory.py)."""
        return step_activation_bytes(self.config, tokens, rows, self.kv_dtype_bytes)

    def prefill_activation_bytes(self, rows: int, width: int, keys: int) -> int:
        """Bytes a batched prefill of `rows` prompts padded to `width` tokens over `keys`
        positions allocates and frees (models/memory.py)."""
        return prefill_activation_bytes(
            self.config, rows, width, keys, self.kv_dtype_bytes, self.dequantized_from
        )


def _quant_desc(config: dict[str, Any]) -> str:
    q = config.get("quantization") or {}
    if "bits" in q:
        return f"{q['bits']}-bit, group {q.get('group_size', 64)}"
    return str(config.get("torch_dtype") or config.get("dtype") or "float")


def _dequantize_fp32(module: nn.Module) -> mx.array:
    """fp32 weights of a quantized layer. For affine mode unpacked with plain ops: on the CPU
    backend that is several times faster than mx.dequantize, and exact in fp32."""
    if module.mode != "affine" or 32 % module.bits:
        return mx.dequantize(
            module.weight,
            module.scales,
            module.biases,
            module.group_size,
            module.bits,
            mode=module.mode,
        ).astype(mx.float32)
    q, bits, gs = module.weight, module.bits, module.group_size
    shifts = mx.arange(32 // bits, dtype=mx.uint32) * bits
    vals = ((q[..., None] >> shifts) & ((1 << bits) - 1)).reshape(q.shape[0], -1, gs)
    scales = module.scales.astype(mx.float32)[..., None]
    biases = module.biases.astype(mx.float32)[..., None]
    return (vals.astype(mx.float32) * scales + biases).reshape(q.shape[0], -1)


def cpu_weight_format(weights_on_cpu: str) -> str:
    """The format a CPU load really uses: the quantized ones need mlxd's kernels (else fp32)."""
    if weights_on_cpu != "fp32" and not qkernels.available():
        return "fp32"
    return weights_on_cpu


def _upcast_small(model: nn.Module) -> None:
    """Norm weights and biases in float32, so activations stay float32 between kernel matmuls."""
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for key, value in params:
        if value.ndim <= 1 and value.dtype in (mx.float16, mx.bfloat16):
            model.update(tree_unflatten([(key, value.astype(mx.float32))]))


def _to_fp32(model: nn.Module) -> None:
    """Dequantize quantized layers and upcast half weights to fp32, one module at a time."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            w = _dequantize_fp32(module)
            mx.eval(w)
            if isinstance(module, nn.QuantizedEmbedding):
                new: nn.Module = nn.Embedding(*w.shape)
            else:
                has_bias = "bias" in module
                new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
                if has_bias:
                    new.bias = module.bias.astype(mx.float32)
            new.weight = w
            replace_module(model, name, new)
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for key, value in params:
        if value.dtype in (mx.float16, mx.bfloat16):
            upcast = value.astype(mx.float32)
            mx.eval(upcast)
            model.update(tree_unflatten([(key, upcast)]))


def _activation_bytes(model: nn.Module) -> int:
    for _, m in model.named_modules():
        if isinstance(m, CpuQuantizedEmbedding):
            return 4
        if isinstance(m, nn.QuantizedEmbedding):
            return m.scales.dtype.size
        if isinstance(m, nn.Embedding):
            return m.weight.dtype.size
    return 4


def load_model(
    path: str | Path,
    name: str,
    weights_on_cpu: str = "fp32",
    prepare: Callable[[nn.Module], None] | None = None,
) -> LoadedModel:
    """Build the mlx-lm model of a folder and its tokenizer; ModelLoadError names the model only.
    `prepare` gets the model as built, before any weight is read: what it drops is never read
    (a pipeline rank keeps its own layers only: models/pipeline.py); its errors propagate."""
    if weights_on_cpu not in WEIGHTS_ON_CPU:
        raise ValueError(f"weights_on_cpu must be one of {WEIGHTS_ON_CPU}")
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelLoadError(name, "its config.json is missing or unreadable") from None
    arch = str(config.get("model_type") or "")
    if not arch:
        raise ModelLoadError(name, "its config.json names no model_type")
    files = weight_files(path)
    if not files:
        raise ModelLoadError(name, "it has no safetensors weights")
    for f in files:
        try:
            read_safetensors_header(f)
        except (OSError, SafetensorsError) as e:
            raise ModelLoadError(name, f"a weights file is corrupt ({e})") from None
    tokenizer = Tokenizer.load(path, name, config)
    model = _build(path, name, arch)
    if prepare is not None:
        prepare(model)
    on_cpu = backend() == "cpu"
    fmt_cpu = cpu_weight_format(weights_on_cpu) if on_cpu else weights_on_cpu
    if on_cpu and fmt_cpu != weights_on_cpu:
        log.warning(
            "weights_on_cpu=%s needs mlxd's CPU kernels, which are %s; loading fp32",
            weights_on_cpu,
            qkernels.unavailable_reason(),
        )
    dequant = on_cpu and fmt_cpu == "fp32"
    stored = _quant_desc(config)
    on_kernels = False
    try:
        if dequant:
            _to_fp32(model)
            transpose_for_cpu(model)  # fast small-M GEMMs for batched decoding: cpu_layout.py
            fast_activations(model)  # SwiGLU without MLX's slow CPU exp: cpu_layout.py
        elif on_cpu and quantize_for_cpu(model, fmt_cpu):  # the kernels: quant_layers.py
            on_kernels = True
            _upcast_small(model)
            fuse_mlps(model)  # gate/up/SwiGLU/down as one op: fused_mlp.py
            fast_activations(model)  # MLPs left unfused
        if (dequant or on_kernels) and qkernels.available():
            fuse_for_cpu(model)  # one-pass RMSNorm / RoPE, decode attention: fused_layers.py
            fuse_blocks(model)  # a decode step's layer as one kernel op: fused_block.py
            fuse_stacks(model)  # and all of them as one: fused_stack.py
            fuse_gemma_blocks(model)  # gemma3's layers likewise: fused_gemma.py
        mx.eval(model.parameters())
    except Exception as e:  # noqa: BLE001 - a bad tensor surfaces at eval
        raise ModelLoadError(name, f"its weights cannot be read ({type(e).__name__})") from None
    flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    weight_bytes = sum(v.nbytes for _, v in flat)
    if dequant and stored != "float32":
        fmt = f"fp32 (dequantized from {stored})"
    elif on_kernels and (fmt_cpu == "q8" or "quantization" not in config):
        fmt = f"q8 (8-bit, group 32, from {stored})"
    else:
        fmt = f"as stored ({stored})"
    return LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        architecture=arch,
        context_length=context_length(config),
        sliding_window=sliding_window(config),
        eos_token_ids=set(tokenizer.eos_token_ids),
        weight_bytes=int(weight_bytes),
        weight_format=fmt,
        kv_dtype_bytes=_activation_bytes(model),
        dequantized_from=qkernels.BLAS_ROWS if on_kernels and qkernels.available() else 0,
        vocab_size=vocab_size(model, config, tokenizer.vocab_size),
    )


def vocab_size(model: nn.Module, config: dict[str, Any], tokenizer_size: int) -> int:
    """The ids a gather into the token embedding can take, and the tokenizer knows: the smaller
    of the embedding's rows and the tokenizer's size (tables are often padded past the vocabulary;
    a tokenizer's added tokens may lack rows)."""
    rows = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("embed_tokens", "wte", "tok_embeddings") and hasattr(
            module, "weight"
        ):
            rows = int(module.weight.shape[0])
            break
    if rows <= 0:  # an architecture naming its table otherwise: the config built it
        rows = int(text_config(config).get("vocab_size") or 0)
    sizes = [n for n in (rows, tokenizer_size) if n > 0]
    return min(sizes) if sizes else 0


def _build(path: Path, name: str, arch: str) -> nn.Module:
    from mlx_lm.utils import load_model as mlx_load_model

    try:
        model, _ = mlx_load_model(path, lazy=True, strict=True, trust_remote_code=False)
    except ValueError as e:
        if "not supported" in str(e):
            raise ModelLoadError(name, f"architecture '{arch}' is not supported") from None
        log.debug("load failed", exc_info=True)
        raise ModelLoadError(name, "its weights do not match its config") from None
    except Exception as e:  # noqa: BLE001
        log.debug("load failed", exc_info=True)
        raise ModelLoadError(name, f"its weights cannot be read ({type(e).__name__})") from None
    return model
