"""Build tiny random models on disk in the HF / MLX layout, for fast tests of the whole load path.

`make_tiny_model(dir)` writes config.json, model.safetensors (random fp32 weights, or MLX 4/8-bit
quantized with `bits=`), a real byte-level BPE tokenizer.json trained in-process (any text
encodes), tokenizer_config.json with a ChatML template, and generation_config.json.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT, IM_START, IM_END = 0, 1, 2
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINK_SPECIALS = ("<think>", "</think>")  # ids 3 and 4 of a thinking model
# A thinking model's template opens the thinking block unless asked not to (Qwen3's kind).
THINKING_CHATML = CHATML.replace(
    "assistant\n{% endif %}",
    "assistant\n{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}"
    "{% endif %}",
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny model for tests",
    "The capital of France is Paris. One two three four five.",
]


@lru_cache(maxsize=4)
def tiny_tokenizer_json(vocab: int = 300, extra_specials: tuple[str, ...] = ()) -> str:
    """A byte-level BPE tokenizer (as tokenizer.json text) with ChatML specials at ids 0..2
    (then `extra_specials`)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tk_models

    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[*SPECIALS, *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def _config(arch: str, layers: int, hidden: int, vocab: int) -> dict:
    heads = 4
    cfg = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": IM_END,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    elif arch == "qwen2":  # biases on q/k/v
        cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    elif arch == "qwen3":
        cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    elif arch == "gemma3":
        cfg.update(
            model_type="gemma3_text",
            architectures=["Gemma3ForCausalLM"],
            sliding_window=8,
            sliding_window_pattern=2,
            query_pre_attn_scalar=hidden // heads,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch}")
    return cfg


def make_tiny_model(
    dir: str | Path,
    arch: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    vocab: int = 300,
    seed: int = 0,
    bits: int | None = None,
    thinking: bool = False,
) -> Path:
    """Write a tiny random model folder at `dir` and return it. bits=4|8 stores MLX quantized
    weights (group 32) with a "quantization" config, as an MLX hub repo would. `thinking`: a
    reasoning model (`<think>` markers, a template that opens the thinking block)."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_json = tiny_tokenizer_json(vocab, THINK_SPECIALS if thinking else ())
    real_vocab = len(json.loads(tok_json)["model"]["vocab"])
    cfg = _config(arch, layers, hidden, max(vocab, real_vocab))
    module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    if hasattr(model, "sanitize"):
        model.sanitize({})  # gemma3 drops its lm_head when tied
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
        cfg["quantization"] = {"group_size": 32, "bits": bits}
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.json").write_text(tok_json)
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": THINKING_CHATML if thinking else CHATML,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    gen = {"eos_token_id": [IM_END, ENDOFTEXT]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


# Prompts of mixed lengths: merged into batch caches they are left-padded differently.
BATCH_PROMPTS = ([5, 9, 30, 2, 7], [11, 3, 250, 4, 8, 60, 1, 99, 42, 17, 6], [77])


def batched_greedy_logits(
    model: nn.Module, steps: int, window: int | None = None, prompts=BATCH_PROMPTS
) -> list[mx.array]:
    """Each prompt prefilled alone, the caches merged into batch caches (left padding, as the
    engine merges them), then `steps` greedy decode steps from tokens 1, 2, 3...: each step's
    last-position logits [B, V]. `window` makes the caches rotating ones."""
    from mlx_lm.models.cache import make_prompt_cache

    per_row = []
    for p in prompts:
        cache = make_prompt_cache(model, window)
        model(mx.array([p]), cache=cache)
        per_row.append(cache)
    batch = [type(layer[0]).merge(list(layer)) for layer in zip(*per_row, strict=True)]
    x, out = mx.arange(1, len(prompts) + 1)[:, None], []
    for _ in range(steps):
        step = model(x, cache=batch)[:, -1]
        out.append(step)
        x = mx.argmax(step, axis=-1)[:, None]
    return out
