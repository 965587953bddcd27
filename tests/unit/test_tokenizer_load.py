"""Loading a model's tokenizer: one parse per set of tokenizer files while a model holds it, and
the same tokenizer as transformers' own route (which parses tokenizer.json twice)."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

from models.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  spaces\tand\n\nnewlines",
    "<|im_start|>user\nhi<|im_end|>",
    "émoji 🚀 中文",
]


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_folders_with_the_same_tokenizer_files_share_one(tiny_model_dir: Path, tmp_path: Path):
    a = Tokenizer.load(tiny_model_dir, "a")
    b = Tokenizer.load(_copy(tiny_model_dir, tmp_path / "b"), "b")
    weights = _copy(tiny_model_dir, tmp_path / "weights")
    (weights / "model.safetensors").write_bytes(b"other weights: not a tokenizer file")
    other = _copy(tiny_model_dir, tmp_path / "other")
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))

    assert b.hf is a.hf
    assert Tokenizer.load(weights, "weights").hf is a.hf
    c = Tokenizer.load(other, "other")
    assert c.hf is not a.hf
    assert c.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    assert a.apply_chat_template([{"role": "user", "content": "hi"}]) != "hi"


def test_a_tokenizer_no_model_holds_is_not_kept(tiny_model_dir: Path) -> None:
    tok = Tokenizer.load(tiny_model_dir, "a")
    ref = weakref.ref(tok.hf)
    del tok
    gc.collect()
    assert ref() is None  # sharing costs no memory once the models using it are gone


def _facts(hf: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "backend": hf.backend_tokenizer.to_str(),
        "len": len(hf),
        "special": {k: str(v) for k, v in hf.special_tokens_map.items()},
        "special_ids": sorted(hf.all_special_ids),
        "added": {i: repr(t) for i, t in hf.added_tokens_decoder.items()},
        "chat": hf.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        ),
    }
    for text in TEXTS:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            facts[f"{text}/{special}"] = (ids, hf.decode(ids, skip_special_tokens=True))
    return facts


def test_the_same_tokenizer_as_transformers_own_route(smollm2_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    # A copy, so no tokenizer another test loaded from the same files is shared into this one.
    path = _copy(smollm2_dir, tmp_path / "smollm2")
    (path / "generation_config.json").write_text('{"eos_token_id": 2}')
    ours = Tokenizer.load(path, "smollm2").hf
    reference = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert _facts(ours) == _facts(reference)


def test_decode_is_transformers_decode(smollm2_dir: Path) -> None:
    """Decoding straight through the Rust tokenizer gives transformers' text: every window of
    ids (split UTF-8, special tokens kept or skipped)."""
    tok = Tokenizer.load(smollm2_dir, "smollm2")
    ids = tok.encode("<|im_start|>user\nHé, naïve café ☕ — 東京 12.5% ok ?<|im_end|>")
    for start in range(len(ids)):
        for end in range(start, min(len(ids), start + 6) + 1):
            for skip in (True, False):
                window = ids[start:end]
                assert tok.decode(window, skip) == tok.hf.decode(window, skip_special_tokens=skip)
    for i in ids:
        assert tok.id_to_token_text(i) == tok.hf.decode([i], skip_special_tokens=False)


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode(smollm2_dir: Path) -> None:
    hf = Tokenizer.load(smollm2_dir, "smollm2").hf  # shared: its settings are put back
    names = ["clean_up_tokenization_spaces"]
    names.append("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    saved = {n: hf.__dict__[n] for n in names if n in hf.__dict__}
    for n in names:
        setattr(hf, n, True)
    try:
        ids = hf.encode("a , b .", add_special_tokens=False)
        assert Tokenizer(hf, set()).decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert Tokenizer(hf, set()).decode(ids) == "a, b."  # cleaned, as transformers does
    finally:
        for n in names:
            if n in saved:
                setattr(hf, n, saved[n])
            else:
                hf.__dict__.pop(n, None)
