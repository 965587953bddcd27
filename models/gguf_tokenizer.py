"""Build tokenizer.json / tokenizer_config.json from a GGUF file's vocabulary, without torch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from models.errors import ImportFailedError

log = logging.getLogger("mlxd.gguf")


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def write_tokenizer(reader: Any, arch: str, dest: Path) -> dict[str, Any]:
    """Write tokenizer.json and tokenizer_config.json into dest; return the special-token facts
    ({"bos_token_id", "eos_token_id", ...}) the generation config needs."""
    # Imported here: transformers is slow to import and only import needs it.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tok_dict: dict[str, Any] = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        value = _field(reader, f"tokenizer.{key}")
        if value is not None:
            tok_dict[name] = value
    if "tokens" not in tok_dict:
        raise ImportFailedError("the GGUF file has no tokenizer vocabulary")
    try:
        backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    except Exception as e:  # noqa: BLE001 - any converter failure is one clear import error
        log.debug("tokenizer conversion failed", exc_info=True)
        raise ImportFailedError(
            f"cannot build a tokenizer from the GGUF vocabulary ({type(e).__name__})"
        ) from None
    backend.save(str(dest / "tokenizer.json"))

    tokens: list[str] = tok_dict["tokens"]

    def tok(key: str) -> str | None:
        idx = tok_dict.get(key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = tok_dict.get("tokenizer_type") == "llama"  # sentencepiece files default to BOS
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "unk_token": tok("unk_token_id"),
        "pad_token": tok("pad_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token") or False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
    return {
        k: tok_dict[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if isinstance(tok_dict.get(k), int)
    }
