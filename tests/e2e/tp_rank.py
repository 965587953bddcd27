"""One rank of the tensor-parallel check (run by mlx.launch, or alone for the reference): loads
SmolLM2 through mlxd's registry, shards it over the group when there is one, decodes greedily and
prints one JSON line: rank, size, resident weight bytes, tokens per prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from models.registry import ModelRegistry  # first: models/ preloads the fast BLAS before mlx
from models.sharding import resident_weight_bytes, shard_tensor

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village,"]


def main(models_dir: str, n_tokens: int) -> None:
    import mlx.core as mx

    group = mx.distributed.init()
    loaded = ModelRegistry(Path(models_dir)).acquire("smollm2:135m", -1)
    full = resident_weight_bytes(loaded.model)
    if group.size() > 1:
        shard_tensor(loaded.model, group)
    outputs = []
    for prompt in PROMPTS:
        cache = loaded.make_cache()
        x = mx.array([loaded.tokenizer.encode(prompt)], dtype=mx.int32)
        tokens: list[int] = []
        for _ in range(n_tokens):
            tok = mx.argmax(loaded.model(x, cache=cache)[:, -1, :], axis=-1)
            tokens.append(int(tok.item()))
            x = tok[:, None]
        outputs.append(tokens)
    report = {
        "rank": group.rank(),
        "size": group.size(),
        "full_bytes": full,
        "weight_bytes": resident_weight_bytes(loaded.model),
        "tokens": outputs,
    }
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
