"""Tensor-parallel sharding (models/sharding.py) across 3 real processes on loopback:
`mlx.launch --backend ring -n 3`, SmolLM2 (9 query heads, 3 KV heads) split 3 ways. Greedy tokens
equal the single-process ones token for token; each rank holds its third of the layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.sharding import ShardingError, check_config_split
from tests.e2e.ring import ring_launch

RANK_SCRIPT = Path(__file__).with_name("tp_rank.py")
ROOT = Path(__file__).resolve().parents[2]
N_TOKENS = 12


def _results(cmd: list[str]) -> list[dict]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    return sorted((json.loads(ln[len("RESULT ") :]) for ln in lines), key=lambda r: r["rank"])


@pytest.mark.slow
def test_three_ranks_equal_one_process(smollm2_dir: Path) -> None:
    args = [str(RANK_SCRIPT), str(smollm2_dir.parent), str(N_TOKENS)]
    (alone,) = _results([sys.executable, *args])
    ranks = _results(ring_launch(3, args))
    assert [r["rank"] for r in ranks] == [0, 1, 2] and all(r["size"] == 3 for r in ranks)
    for r in ranks:
        assert r["tokens"] == alone["tokens"]
    # The embedding (tied lm_head, 28M of 135M parameters) stays whole on every rank, as in
    # mlx-lm; the 30 layers are split three ways.
    full = alone["full_bytes"]
    embed = 49152 * 576 * 4
    for r in ranks:
        share = embed + (full - embed) / 3
        assert abs(r["weight_bytes"] - share) / share < 0.02, (r["weight_bytes"], share)


def test_a_split_the_heads_cannot_take_is_refused() -> None:
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    check_config_split(smollm2, 3)
    with pytest.raises(ShardingError, match="9 query heads and 3 KV heads do not divide over 2"):
        check_config_split(smollm2, 2)
    with pytest.raises(ShardingError, match="MLP width 1536 does not divide over 5"):
        check_config_split({"num_attention_heads": 10, "num_key_value_heads": 5,
                            "intermediate_size": 1536}, 5)  # fmt: skip
