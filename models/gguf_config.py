"""GGUF metadata -> mlx-lm config.json, and GGUF tensor names -> Hugging Face names, per architecture."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from models.errors import ImportFailedError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# GGUF block tensor -> HF module path inside `model.layers.N.`
_COMMON_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_BLOCK = {**_COMMON_BLOCK, "ffn_norm": "post_attention_layernorm"}
_GEMMA3_BLOCK = {
    **_COMMON_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias|scales|biases)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias|scales|biases)$")


@dataclass
class ArchSpec:
    """What the importer needs to know about one architecture."""

    arch: str
    config: dict[str, Any]
    permute_qk: bool  # llama.cpp permuted Q/K rows for its interleaved RoPE: undo at import
    norm_minus_one: bool  # gemma stores RMSNorm weights as (1 + w)
    n_heads: int
    n_kv_heads: int


def _get(meta: dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", default)


def _require(meta: dict[str, Any], arch: str, key: str) -> Any:
    value = meta.get(f"{arch}.{key}")
    if value is None:
        raise ImportFailedError(f"the GGUF file lacks '{arch}.{key}'")
    return value


def arch_spec(meta: dict[str, Any], tensor_names: set[str], vocab_size: int) -> ArchSpec:
    """Build the mlx-lm config of a GGUF file; ImportFailedError for architectures we can't map."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ImportFailedError(
            f"GGUF architecture '{arch}' is not supported for import "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    hidden = int(_require(meta, arch, "embedding_length"))
    n_heads = int(_require(meta, arch, "attention.head_count"))
    n_kv = int(_get(meta, arch, "attention.head_count_kv", n_heads))
    head_dim = int(_get(meta, arch, "attention.key_length", hidden // n_heads))
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(_require(meta, arch, "block_count")),
        "intermediate_size": int(_require(meta, arch, "feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": int(_get(meta, arch, "vocab_size", vocab_size)),
        "max_position_embeddings": int(_get(meta, arch, "context_length", 4096)),
        "rope_theta": float(_get(meta, arch, "rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if arch == "gemma3":
        cfg.update(
            model_type="gemma3_text",
            architectures=["Gemma3ForCausalLM"],
            sliding_window=int(_get(meta, arch, "attention.sliding_window", 512)),
            sliding_window_pattern=6,  # not in GGUF metadata; every Gemma 3 uses 5 local : 1 global
            query_pre_attn_scalar=head_dim,
            rope_local_base_freq=10000.0,
        )
    elif arch == "llama":
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False)
        cfg["mlp_bias"] = False
    elif arch == "qwen2":
        cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    elif arch == "qwen3":
        cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    return ArchSpec(
        arch=arch,
        config=cfg,
        permute_qk=arch == "llama",
        norm_minus_one=arch == "gemma3",
        n_heads=n_heads,
        n_kv_heads=n_kv,
    )


def hf_name(arch: str, gguf_name: str) -> str | None:
    """HF tensor name of a GGUF tensor (`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`);
    None for tensors the model doesn't use (e.g. rope_freqs)."""
    block = _GEMMA3_BLOCK if arch == "gemma3" else _LLAMA_BLOCK
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, kind = m.groups()
        mod = block.get(part)
        return f"model.layers.{layer}.{mod}.{kind}" if mod else None
    if m := _TOP_RE.match(gguf_name):
        part, kind = m.groups()
        mod = _TOP.get(part)
        return f"{mod}.{kind}" if mod else None
    return None


def qk_heads(spec: ArchSpec, gguf_name: str) -> int | None:
    """Number of heads whose rows to un-permute for this tensor, or None when it isn't Q/K."""
    if not spec.permute_qk:
        return None
    if re.match(r"^blk\.\d+\.attn_q\.", gguf_name):
        return spec.n_heads
    if re.match(r"^blk\.\d+\.attn_k\.", gguf_name):
        return spec.n_kv_heads
    return None
