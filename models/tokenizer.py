"""The tokenizer a loaded model exposes to the engine and server (offline; no remote code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError


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


class Tokenizer:
    """Encode/decode and chat templates over mlx-lm's TokenizerWrapper.

    `wrapper` is the mlx-lm TokenizerWrapper (its `detokenizer` streams text); `hf` the
    transformers tokenizer underneath.
    """

    def __init__(self, wrapper: Any, eos_token_ids: set[int], add_bos: bool | None = None):
        self.wrapper = wrapper
        self.hf = getattr(wrapper, "_tokenizer", wrapper)
        self.eos_token_ids: set[int] = set(eos_token_ids)
        if self.hf.eos_token_id is not None:
            self.eos_token_ids.add(int(self.hf.eos_token_id))
        self.bos_token_id: int | None = self.hf.bos_token_id
        self._add_bos = bool(add_bos) and self.bos_token_id is not None
        self.chat_template: str | None = getattr(self.hf, "chat_template", None) or None
        self.vocab_size: int = len(self.hf)

    @classmethod
    def load(cls, path: Path, name: str, config: dict[str, Any] | None = None) -> Tokenizer:
        """Load from a model folder without touching the network; ModelLoadError if absent/broken."""
        from mlx_lm.utils import load_tokenizer

        path = Path(path)
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
            raise ModelLoadError(name, "the model has no tokenizer")
        eos = collect_eos_ids(path, config)
        try:
            wrapper = load_tokenizer(path, eos_token_ids=sorted(eos) or None)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is one clear message
            raise ModelLoadError(
                name, f"its tokenizer cannot be read ({type(e).__name__})"
            ) from None
        add_bos = _read_json(path / "tokenizer_config.json").get("add_bos_token")
        return cls(wrapper, eos, add_bos=add_bos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. Chat prompts (their template writes BOS) pass add_special_tokens=False."""
        ids = list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        if add_special_tokens and self._add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # tokenizer.json without a BOS post-processor
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

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
        return self.hf.decode([int(token_id)], skip_special_tokens=False)
