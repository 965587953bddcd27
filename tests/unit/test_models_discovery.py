"""Listing models reads files only: no MLX is imported (import-linter checks the imports;
this checks a real listing in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_listing_models_does_not_import_mlx(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "llama--tiny")
    make_tiny_model(tmp_path / "qwen--q4", arch="qwen3", bits=4)
    code = (
        "import sys\n"
        "from models.discovery import scan\n"
        "names = sorted(scan(sys.argv[1]))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
        "print(names, loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "['llama:tiny', 'qwen:q4'] []"


def test_bundled_models_module_does_not_import_the_registry() -> None:
    """models.default only locates bundled files (the old default <-> registry cycle)."""
    code = "import sys, models.default\nprint('models.registry' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
