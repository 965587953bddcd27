"""`make soak`: N streams against a real `mlxd serve` for minutes, its RSS checked against what
it holds (bench/soak.py). Not part of `make test`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
