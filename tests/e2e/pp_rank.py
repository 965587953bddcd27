"""One rank of the pipeline-parallel check (run by mlx.launch, or alone for the reference).

Loads a model through mlxd's registry, reading only this rank's layers when there is a group
(models/pipeline.py) and drives the engine's own ModelRunner through a fixed plan, the same on
every rank (as `serve --distributed` replays rank 0's plan): 8 prompts of different lengths
prefill as one left-padded batch and decode together; one row leaves early while a 9th prompt
prefills in two chunks and joins the batch; then one prompt runs alone. Prints one JSON line:
rank, size, the split, resident weight bytes, peak memory at load and, per prompt, the greedy tokens rank 0 sampled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from models.registry import ModelRegistry  # first: models/ preloads the fast BLAS before mlx

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a village by the sea, there lived",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "Water boils at",
    "Here is a list of the planets of the solar system:",
    "Hello",
]
JOINS = "The best way to learn a language is"  # joins the running batch
ALONE = "In 1969, the first man on the moon was"


def main(models_dir: str, model: str, n_tokens: int, weights: str) -> None:
    import mlx.core as mx

    from engine.outputs import ScheduledSeq, SchedulerOutput
    from engine.runner import ModelRunner
    from engine.sequence import Sequence
    from engine.types import GenerateRequest, SamplingParams
    from models.pipeline import PipelineSplit
    from models.sharding import resident_weight_bytes

    group = mx.distributed.init()
    registry = ModelRegistry(Path(models_dir), weights_on_cpu=weights)
    split = PipelineSplit(group) if group.size() > 1 else None
    if split is not None:  # the other ranks' layers are never read
        registry.prepare_model = split.cut
    loaded = registry.acquire(model, -1)
    stage = split.finish(loaded.model) if split is not None else None
    if stage is not None:
        loaded.weight_bytes = stage.weight_bytes
    loaded_peak = mx.get_peak_memory()
    embedding = resident_weight_bytes(loaded.model.model.embed_tokens)
    runner = ModelRunner(loaded.model, loaded.make_cache)
    tokens: dict[str, list[int]] = {}

    def seq(i: int, text: str) -> Sequence:
        ids = loaded.tokenizer.encode(text)
        params = SamplingParams(max_tokens=n_tokens, temperature=0.0)
        return Sequence(GenerateRequest(f"s{i}", model, ids, params))

    def step(scheduled: list[ScheduledSeq], finished: list[Sequence] = ()) -> None:  # type: ignore[assignment]
        out = runner.execute(SchedulerOutput(list(scheduled), list(finished)))
        assert not out.failed, out.failed
        for sid, got in out.tokens.items():
            tokens.setdefault(sid, []).extend(int(t.token) for t in got)

    def decode(rows: list[Sequence]) -> list[ScheduledSeq]:
        return [ScheduledSeq(s, 1, s.num_prompt + len(tokens[s.id]) - 1, True) for s in rows]

    batch = [seq(i, p) for i, p in enumerate(PROMPTS)]
    step([ScheduledSeq(s, s.num_prompt, 0, True) for s in batch])  # one batched prefill
    for _ in range(3):
        step(decode(batch))
    joining = seq(len(PROMPTS), JOINS)
    half = joining.num_prompt // 2
    leaving, batch = batch[0], batch[1:]
    step([*decode(batch), ScheduledSeq(joining, half, 0, False)], [leaving])
    step([*decode(batch), ScheduledSeq(joining, joining.num_prompt - half, half, True)])
    batch.append(joining)
    while len(tokens[joining.id]) < n_tokens:
        step(decode([s for s in batch if len(tokens[s.id]) < n_tokens]))
    alone = seq(len(PROMPTS) + 1, ALONE)
    step([], batch)
    step([ScheduledSeq(alone, alone.num_prompt, 0, True)])
    while len(tokens[alone.id]) < n_tokens:
        step(decode([alone]))
    report = {
        "rank": group.rank(),
        "size": group.size(),
        "layers": [stage.layers.start, stage.layers.stop] if stage else None,
        "num_layers": stage.num_layers if stage else None,
        "holds_embedding": stage.holds_embedding if stage else True,
        "weight_bytes": loaded.weight_bytes,
        "weight_format": loaded.weight_format,
        "embedding_bytes": embedding,  # rank 0's, and one process's
        "load_peak_bytes": loaded_peak,
        "tokens": tokens,
    }
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
