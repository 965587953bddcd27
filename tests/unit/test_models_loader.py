"""Loading tiny models: fp32 and as-stored paths, the tokenizer surface, and clear load errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from models.errors import ModelLoadError
from models.loader import load_model
from models.memory import backend
from tests.tiny import IM_END, make_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_tiny_model_loads_and_runs(tmp_path: Path, arch: str) -> None:
    lm = load_model(make_tiny_model(tmp_path / arch, arch=arch), "tiny", "fp32")
    ids = lm.tokenizer.encode("hello wörld ☃")
    logits = lm.model(mx.array([ids]), cache=lm.make_cache())
    assert logits.shape == (1, len(ids), lm.config["vocab_size"])
    assert lm.architecture == lm.config["model_type"]
    assert lm.sliding_window == (8 if arch == "gemma3" else None)
    # 2 layers x 2 kv heads x head dim 16 x (k, v) x fp32
    assert lm.kv_bytes_per_token() == 2 * 2 * 16 * 2 * 4


def test_quantized_model_fp32_vs_as_stored(tmp_path: Path) -> None:
    """weights_on_cpu="fp32" dequantizes on the CPU backend only; Metal and CUDA keep the
    stored format either way. The numbers agree in both cases."""
    from models import qkernels

    path = make_tiny_model(tmp_path / "q", bits=4)
    fp32 = load_model(path, "q", "fp32")
    stored = load_model(path, "q", "as_stored")
    if backend() == "cpu" and not qkernels.available():
        # Without mlxd's kernels the quantized formats load as fp32 on the CPU backend.
        assert stored.weight_format == fp32.weight_format
        return
    assert stored.weight_format.startswith("as stored (4-bit")
    q_proj = fp32.model.model.layers[0].self_attn.q_proj
    if backend() == "cpu":
        assert fp32.weight_format.startswith("fp32 (dequantized from 4-bit")
        assert fp32.weight_bytes > 3 * stored.weight_bytes
        assert q_proj.weight.dtype == mx.float32 and q_proj.weight.shape == (64, 64)
        params = fp32.model.parameters()
        if "weight_t" in params["model"]["layers"][0]["self_attn"]["q_proj"]:  # the CPU layout
            assert q_proj.weight_t.shape == (64, 64)
    else:
        assert fp32.weight_format == stored.weight_format
        assert fp32.weight_bytes == stored.weight_bytes
    ids = mx.array([fp32.tokenizer.encode("the quick brown fox")])
    a, b = fp32.model(ids), stored.model(ids)
    assert mx.allclose(a, b, atol=1e-3, rtol=1e-3).item()  # same numbers, whatever the format


def test_tokenizer_surface(tiny_model_dir: Path) -> None:
    tok = load_model(tiny_model_dir, "tiny").tokenizer
    assert tok.eos_token_ids == {0, IM_END}  # config's eos plus generation_config's list
    text = "hello world, the fox"
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt, add_special_tokens=False)[0] == 1  # <|im_start|>, not doubled
    assert tok.id_to_token_text(IM_END) == "<|im_end|>"
    assert tok.vocab_size >= 256


def test_base_model_chat_template_error(tiny_model_dir: Path) -> None:
    cfg_path = tiny_model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    tok = load_model(tiny_model_dir, "base").tokenizer
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def _assert_clean(err: ModelLoadError, name: str, tmp_path: Path) -> None:
    msg = str(err)
    assert f"'{name}'" in msg
    assert str(tmp_path) not in msg and "Traceback" not in msg and "0x" not in msg


def test_truncated_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    f = tiny_model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="corrupt") as err:
        load_model(tiny_model_dir, "broken:1")
    _assert_clean(err.value, "broken:1", tmp_path)


def test_garbage_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tiny_model_dir / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError) as err:
        load_model(tiny_model_dir, "garbage")
    _assert_clean(err.value, "garbage", tmp_path)


def test_missing_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tiny_model_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer") as err:
        load_model(tiny_model_dir, "notok")
    _assert_clean(err.value, "notok", tmp_path)


def test_unknown_architecture(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg_path = tiny_model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "nonexistent_arch"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="architecture 'nonexistent_arch'") as err:
        load_model(tiny_model_dir, "alien")
    _assert_clean(err.value, "alien", tmp_path)


def test_weights_not_matching_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg_path = tiny_model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_model(tiny_model_dir, "mismatch")
    _assert_clean(err.value, "mismatch", tmp_path)


def test_cpu_layout_keeps_the_numbers(tmp_path: Path) -> None:
    """Transposed weights and the polynomial-exp SwiGLU give the same logits as mlx-lm's modules."""
    from models.cpu_layout import (
        FastSwiGLUMLP,
        TransposedLinear,
        fast_activations,
        transpose_for_cpu,
    )
    from models.fast_math import fast_exp

    x = mx.linspace(-80, 80, 10001)
    assert (mx.abs(fast_exp(x) - mx.exp(x)) / mx.exp(x)).max().item() < 1e-5
    assert fast_exp(mx.array([-mx.inf, -200.0])).tolist() == [0.0, 0.0]
    from tests.unit.engine_harness import tiny_llama

    model = tiny_llama()  # mlx-lm's modules, as built
    ids = mx.array([[3, 17, 42, 7, 99, 5]])
    ref = model(ids)
    assert transpose_for_cpu(model) > 0 and fast_activations(model) == 2
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, FastSwiGLUMLP) and isinstance(
        layer.mlp.gate_proj, TransposedLinear
    )
    assert mx.allclose(model(ids), ref, atol=1e-4).item()
