"""GGUF import of a qwen2 file (Qwen2 / Qwen2.5's layout: q/k/v biases, tied embeddings, rope
theta 1e6, a gpt2-type BPE vocabulary): a tiny random one written with the `gguf` package, then
imported, loaded and decoded against mlx-lm's qwen2 built from the same (dequantized) weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen2

from models import qkernels
from models.fused_block import FusedBlock
from models.gguf import import_gguf
from models.loader import load_model
from tests.tiny import CHATML, ENDOFTEXT, IM_END, IM_START, tiny_tokenizer_json

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
ROPE_THETA, EPS = 1e6, 1e-6
_MATRICES = {  # GGUF block tensor -> HF module, [rows, cols] (cols: the input size)
    "attn_q": ("self_attn.q_proj", HIDDEN, HIDDEN),
    "attn_k": ("self_attn.k_proj", HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "attn_v": ("self_attn.v_proj", HIDDEN // HEADS * KV_HEADS, HIDDEN),
    "attn_output": ("self_attn.o_proj", HIDDEN, HIDDEN),
    "ffn_gate": ("mlp.gate_proj", FFN, HIDDEN),
    "ffn_up": ("mlp.up_proj", FFN, HIDDEN),
    "ffn_down": ("mlp.down_proj", HIDDEN, FFN),
}
_VECTORS = {  # GGUF block tensor -> HF parameter, size
    "attn_q.bias": ("self_attn.q_proj.bias", HIDDEN),
    "attn_k.bias": ("self_attn.k_proj.bias", HIDDEN // HEADS * KV_HEADS),
    "attn_v.bias": ("self_attn.v_proj.bias", HIDDEN // HEADS * KV_HEADS),
    "attn_norm.weight": ("input_layernorm.weight", HIDDEN),
    "ffn_norm.weight": ("post_attention_layernorm.weight", HIDDEN),
}


def write_tiny_qwen2_gguf(path: Path, qtype_name: str) -> dict[str, np.ndarray]:
    """A qwen2 GGUF file at `path`, its matrices in `qtype_name` (Q8_0, Q4_0, ...); returns its
    weights as float32 under mlx-lm's names (the quantized ones as the file's values)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    tok = json.loads(tiny_tokenizer_json())
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT)
    writer.add_eos_token_id(IM_END)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    ref: dict[str, np.ndarray] = {}

    def matrix(name: str, hf: str, rows: int, cols: int) -> None:
        data = gguf.quants.quantize(rng.normal(0, 0.2, (rows, cols)).astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        ref[hf] = gguf.quants.dequantize(data, qtype).astype(np.float32)

    def vector(name: str, hf: str, values: np.ndarray) -> None:
        writer.add_tensor(name, values.astype(np.float32))
        ref[hf] = values.astype(np.float32)

    matrix("token_embd.weight", "model.embed_tokens.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        for part, (hf, rows, cols) in _MATRICES.items():
            matrix(f"blk.{i}.{part}.weight", f"model.layers.{i}.{hf}.weight", rows, cols)
        for part, (hf, rows) in _VECTORS.items():
            # Biases as large as the projections' outputs (a dropped one shows in the logits).
            values = (
                rng.normal(0, 1, rows) if part.endswith("bias") else 1 + rng.normal(0, 0.2, rows)
            )
            vector(f"blk.{i}.{part}", f"model.layers.{i}.{hf}", values)
    vector("output_norm.weight", "model.norm.weight", 1 + rng.normal(0, 0.2, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


def _greedy(model, ids: list[int], steps: int, cache, forced: list[int] | None = None):
    """`steps` greedy tokens after the prompt `ids` and each step's logits; with `forced`, those
    tokens are fed instead of the argmax (the logits of one sequence, to compare)."""
    tokens, logits = [], []
    step = model(mx.array([ids]), cache=cache)[:, -1]
    for i in range(steps):
        logits.append(step)
        tokens.append(int(mx.argmax(step, axis=-1).item()))
        step = model(mx.array([[forced[i] if forced else tokens[-1]]]), cache=cache)[:, -1]
    return tokens, logits


def _rel_err(got: mx.array, ref: mx.array) -> float:
    return (mx.abs(got - ref).max() / mx.abs(ref).max()).item()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_qwen2_gguf_imports_and_decodes_as_mlx_lm(tmp_path: Path, qtype: str) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    ref_weights = write_tiny_qwen2_gguf(tmp_path / "tiny.gguf", qtype)
    config = import_gguf(tmp_path / "tiny.gguf", tmp_path / "qwen2")
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == ROPE_THETA and config["rms_norm_eps"] == pytest.approx(EPS)
    assert config["quantization"]["bits"] == (8 if qtype == "Q8_0" else 4)

    ref = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    ref.load_weights([(k, mx.array(v)) for k, v in ref_weights.items()])  # strict: every one
    ids = [IM_START, *range(40, 52), IM_END]
    want, want_logits = _greedy(ref, ids, 16, make_prompt_cache(ref))
    assert len(set(want)) > 1  # the biases make a model that does not repeat one token

    lm = load_model(tmp_path / "qwen2", "qwen2-tiny", "fp32")  # MLX's dequantized weights
    assert lm.tokenizer.decode(lm.tokenizer.encode("hello world")) == "hello world"
    got, logits = _greedy(lm.model, ids, 16, lm.make_cache())
    assert got == want
    assert max(_rel_err(a, b) for a, b in zip(logits, want_logits, strict=True)) < 1e-4

    if not qkernels.available():
        return
    lm = load_model(tmp_path / "qwen2", "qwen2-tiny", "as_stored")  # the fused kernels
    assert all(isinstance(layer, FusedBlock) for layer in lm.model.layers)
    # The reference's tokens fed: integer activations (VNNI builds) round x to ~15 bits per
    # 32-value block, ~0.2% of the logits here, enough to flip this random model's near ties.
    _, logits = _greedy(lm.model, ids, 16, lm.make_cache(), forced=want)
    assert max(_rel_err(a, b) for a, b in zip(logits, want_logits, strict=True)) < 1e-2
