"""The tokenizer a loaded model exposes to the engine and server (offline; no remote code)."""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError

# Files a tokenizer is never read from: a folder's other files all go into its tokenizer's key.
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz", ".h5", ".msgpack")
# transformers tokenizers by the digest of the files they were read from, while some loaded model
# holds one: a model whose tokenizer files match a loaded model's shares its tokenizer.
_shared: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def collect_eos_ids(path: Path, config: dict[str, Any] | None = None) -> set[int]:
    """Every EOS id: config.json's eos_token_id (int or list) plus generation_config.json's."""
    cfg = config if config is not None else _read_json(path / "config.json")
    ids = _ids(cfg.get("eos_token_id")) | _ids(cfg.get("text_config", {}).get("eos_token_id"))
    return ids | _ids(_read_json(path / "generation_config.json").get("eos_token_id"))


def _files_digest(path: Path) -> str:
    """sha256 over the names and bytes of a folder's non-weight files (hashing 1 MiB chunks
    releases the GIL, so this costs the engine thread nothing)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        if f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _no_legacy_reads(path: Path, tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    """Without `added_tokens_decoder` in tokenizer_config.json (GGUF imports, old exports),
    transformers parses all of tokenizer.json a second time just for its added tokens, which the
    backend parse already holds. An empty one skips that, unless the legacy files it would also
    read (special_tokens_map.json, added_tokens.json) exist."""
    if "added_tokens_decoder" in tokenizer_config:
        return {}
    if (path / "special_tokens_map.json").exists() or (path / "added_tokens.json").exists():
        return {}
    return {"added_tokens_decoder": {}}


def _read_tokenizer(path: Path, name: str, tokenizer_config: dict[str, Any]) -> Any:
    """The transformers tokenizer of a folder. AutoTokenizer directly, not mlx-lm's load_tokenizer:
    its wrapper (streaming detokenizer, think/tool markers) goes unused here and costs three
    get_vocab() copies and another tokenizer.json parse, each holding the GIL while the engine
    thread streams. The tokenizers parse (Rust) left holds it too, for the whole parse: ~66 ms
    of CPU for SmolLM2's 49k BPE, ~1.0 s for gemma3's 262k vocabulary and 515k merges; none of
    tokenizers' constructors (from_file, from_str, from_buffer) releases it. The one stall a
    load still costs, unless a loaded model shares the tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=False,
            **_no_legacy_reads(path, tokenizer_config),
        )
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is one clear message
        raise ModelLoadError(name, f"its tokenizer cannot be read ({type(e).__name__})") from None


class Tokenizer:
    """Encode/decode and chat templates over a transformers fast tokenizer (`hf`)."""

    def __init__(self, hf: Any, eos_token_ids: set[int], add_bos: bool | None = None):
        self.hf = hf
        self.eos_token_ids: set[int] = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            self.eos_token_ids.add(int(self.hf.eos_token_id))
        self.bos_token_id: int | None = self.hf.bos_token_id
        self._add_bos = bool(add_bos) and self.bos_token_id is not None
        self.chat_template: str | None = getattr(self.hf, "chat_template", None) or None
        self.vocab_size: int = len(self.hf)
        # Decoding runs twice per streamed token: the Rust tokenizer's own decode skips
        # transformers' Python around it (7.6 -> 2.4 us a call), which adds nothing unless it
        # cleans up tokenization spaces.
        backend: Any = getattr(self.hf, "backend_tokenizer", None)
        plain = backend is not None and not getattr(self.hf, "clean_up_tokenization_spaces", True)
        self._decode = backend.decode if plain else self.hf.decode

    @classmethod
    def load(cls, path: Path, name: str, config: dict[str, Any] | None = None) -> Tokenizer:
        """Load from a model folder without touching the network; ModelLoadError if absent/broken.
        A folder whose tokenizer files match a loaded model's shares that model's tokenizer."""
        path = Path(path)
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
            raise ModelLoadError(name, "the model has no tokenizer")
        eos = collect_eos_ids(path, config)
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        key = _files_digest(path)
        with _shared_lock:
            hf = _shared.get(key)
        if hf is None:
            hf = _read_tokenizer(path, name, tokenizer_config)
            with _shared_lock:
                hf = _shared.setdefault(key, hf)
        return cls(hf, eos, add_bos=tokenizer_config.get("add_bos_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. Chat prompts (their template writes BOS) pass add_special_tokens=False."""
        ids = list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # tokenizer.json without a BOS post-processor
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._decode(list(ids), skip_special_tokens=skip_special_tokens)  # type: ignore[no-any-return]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text of a conversation; ValueError when the model has no chat template."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template (a base model): use a completion/generate request"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def id_to_token_text(self, token_id: int) -> str:
        """The text of one token as generated (for logprobs); partial UTF-8 shows as U+FFFD."""
        return self._decode([int(token_id)], skip_special_tokens=False)  # type: ignore[no-any-return]
