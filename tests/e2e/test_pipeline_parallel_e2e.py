"""Pipeline parallelism (models/pipeline.py) across 2 real processes on loopback:
`mlx.launch --backend ring -n 2`, each rank holding half the layers and passing hidden states
with send/recv. The engine's ModelRunner runs the same plan on both ranks (a left-padded batch
of 8 prompts prefilled together, a row leaving, a chunked prompt joining, then one prompt alone);
rank 0's greedy tokens equal a single process's token for token. A tiny model runs over 2 and
3 ranks (a middle rank receives and sends on), SmolLM2 over 2 (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.ring import ring_launch
from tests.tiny import make_tiny_model

RANK_SCRIPT = Path(__file__).with_name("pp_rank.py")
ROOT = Path(__file__).resolve().parents[2]


def _results(cmd: list[str], timeout: float) -> list[dict]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    return sorted((json.loads(ln[len("RESULT ") :]) for ln in lines), key=lambda r: r["rank"])


def _alone_and_split(
    models_dir: Path, model: str, n_tokens: int, weights: str, n: int = 2, timeout: float = 900
) -> tuple[dict, list[dict]]:
    args = [str(RANK_SCRIPT), str(models_dir), model, str(n_tokens), weights]
    (alone,) = _results([sys.executable, *args], timeout)
    # Ranks out of step would wait on each other: bounded.
    ranks = _results(ring_launch(n, args), timeout)
    assert [r["rank"] for r in ranks] == list(range(n)) and all(r["size"] == n for r in ranks)
    assert len(alone["tokens"]) == 10 and all(alone["tokens"].values())
    assert ranks[0]["tokens"] == alone["tokens"]  # rank 0 samples; the others' logits are zeros
    assert [r["holds_embedding"] for r in ranks] == [True] + [False] * (n - 1)
    return alone, ranks


@pytest.mark.parametrize(("n", "split"), [(2, [[0, 2], [2, 5]]), (3, [[0, 1], [1, 3], [3, 5]])])
def test_ranks_equal_one_process_on_a_tiny_model(tmp_path: Path, n: int, split: list) -> None:
    make_tiny_model(tmp_path / "tiny", layers=5)
    _, ranks = _alone_and_split(tmp_path, "tiny", 6, "fp32", n, timeout=300)
    assert [r["layers"] for r in ranks] == split


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_smollm2(smollm2_dir: Path) -> None:
    # In the server's default CPU format: Q4_1 as stored, on mlxd's kernels.
    alone, ranks = _alone_and_split(smollm2_dir.parent, "smollm2:135m", 12, "as_stored")
    assert [r["layers"] for r in ranks] == [[0, 15], [15, 30]]
    # Rank 0 holds the embedding (tied: it is the lm_head too, 28M of 135M parameters) and
    # layers 0-14; rank 1 layers 15-29 only: each about half the layer weights.
    full, embed = alone["weight_bytes"], alone["embedding_bytes"]
    assert ranks[0]["embedding_bytes"] == embed and ranks[1]["embedding_bytes"] == 0
    half = (full - embed) / 2
    assert abs(ranks[1]["weight_bytes"] - half) / half < 0.01, (ranks[1]["weight_bytes"], half)
    assert abs(ranks[0]["weight_bytes"] - embed - half) / half < 0.01, ranks[0]["weight_bytes"]
    # A rank never reads the other ranks' layers: its peak while loading (the CPU weight
    # conversion's copies included) is well under one process's (measured: 0.6x; rank 1 holds
    # the embedding until the load ends, to learn the hidden state's dtype).
    for r in ranks:
        assert r["load_peak_bytes"] < 0.7 * alone["load_peak_bytes"], r["load_peak_bytes"]
