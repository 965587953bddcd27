"""The pipeline split (models/pipeline.py) without a launch: the plan, what each rank keeps, and
the refusals. The transfers themselves run across real processes in
tests/e2e/test_pipeline_parallel_e2e.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from models.loader import LoadedModel, load_model
from models.pipeline import (
    PipelineError,
    check_config_pipeline,
    describe_pipeline,
    pipeline_split,
    split_layers,
)
from models.sharding import resident_weight_bytes
from tests.tiny import make_tiny_model
from tests.unit.engine_harness import tiny_llama


@dataclasses.dataclass
class FakeGroup:
    """The split only asks a group its size and rank; no transfer happens before a forward."""

    _rank: int
    _size: int

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _bytes(tree: object) -> int:
    return sum(int(v.nbytes) for _, v in tree_flatten(tree))  # type: ignore[arg-type]


def test_the_layers_split_contiguous_and_balanced() -> None:
    assert split_layers(30, 2) == [range(0, 15), range(15, 30)]
    # The larger slices go to the last ranks: rank 0 also holds the embedding and lm_head.
    assert split_layers(5, 2) == [range(0, 2), range(2, 5)]
    assert split_layers(7, 3) == [range(0, 2), range(2, 4), range(4, 7)]
    assert split_layers(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    for n, size in [(30, 4), (18, 5), (64, 8)]:
        plan = split_layers(n, size)
        assert [i for r in plan for i in r] == list(range(n))
        assert max(map(len, plan)) - min(map(len, plan)) <= 1


def test_splits_that_cannot_work_are_refused() -> None:
    with pytest.raises(PipelineError, match="2 layers cannot be split over 3 ranks.*at most 2"):
        split_layers(2, 3)
    with pytest.raises(PipelineError, match="at least 2 ranks, the group has 1.*mlx.launch"):
        split_layers(30, 1)
    check_config_pipeline({"num_hidden_layers": 30}, 2)
    check_config_pipeline({"text_config": {"num_hidden_layers": 2}}, 2)
    with pytest.raises(PipelineError, match="30 layers cannot be split over 31 ranks"):
        check_config_pipeline({"num_hidden_layers": 30}, 31)
    with pytest.raises(PipelineError, match="names no layer count"):
        check_config_pipeline({"hidden_size": 64}, 2)


@pytest.fixture
def tiny5(tmp_path: Path) -> LoadedModel:
    return load_model(make_tiny_model(tmp_path / "tiny", layers=5), "tiny", "fp32")


def test_rank_0_keeps_the_embedding_and_the_first_layers(tiny5: LoadedModel) -> None:
    inner = tiny5.model.model
    embed, norm = _bytes(inner.embed_tokens.parameters()), _bytes(inner.norm.parameters())
    per_layer = _bytes(inner.layers[0].parameters())
    full = tiny5.weight_bytes
    stage = pipeline_split(tiny5.model, FakeGroup(0, 2))
    assert (stage.rank, stage.size, stage.layers, stage.num_layers) == (0, 2, range(0, 2), 5)
    assert stage.holds_embedding and stage.weight_bytes < full
    assert len(tiny5.model.layers) == 2 and len(tiny5.make_cache()) == 2
    assert stage.weight_bytes == embed + norm + 2 * per_layer
    assert resident_weight_bytes(tiny5.model) == stage.weight_bytes


def test_other_ranks_keep_their_layers_only(tiny5: LoadedModel) -> None:
    inner = tiny5.model.model
    per_layer = _bytes(inner.layers[0].parameters())
    last = inner.layers[4]
    stage = pipeline_split(tiny5.model, FakeGroup(1, 2))
    assert stage.layers == range(2, 5) and not stage.holds_embedding
    assert stage.weight_bytes == 3 * per_layer  # no embedding (tied: no lm_head), no norm
    assert tiny5.model.layers[2] is last
    # Caches for its own layers only; the model's make_cache reads the (wrapped) first layer.
    assert len(tiny5.make_cache()) == 3
    # The dropped embedding still gives the model's forward the shapes it builds masks from.
    assert inner.embed_tokens(mx.array([[1, 2, 3]])).shape == (1, 3, 64)
    assert inner.embed_tokens.as_linear(mx.zeros((2, 1, 64))).shape == (2, 1, tiny5.vocab_size)


def test_an_untied_lm_head_stays_on_rank_0_only() -> None:
    untied = tiny_llama()
    assert "lm_head" in untied
    pipeline_split(untied, FakeGroup(1, 2))
    assert _bytes(untied.lm_head.parameters()) == 0
    assert untied.lm_head(mx.zeros((3, 1, 64))).shape == (3, 1, 300)
    kept = tiny_llama()
    pipeline_split(kept, FakeGroup(0, 2))
    assert _bytes(kept.lm_head.parameters()) == 64 * 300 * 4


def test_the_split_described() -> None:
    assert describe_pipeline(30, 2) == (
        "pipeline parallel over 2 ranks; rank 0: embedding, lm_head, layers 0-14; "
        "rank 1: layers 15-29"
    )


def test_models_the_split_cannot_serve_are_refused_untouched(tmp_path: Path) -> None:
    two = load_model(make_tiny_model(tmp_path / "two", layers=2), "two", "fp32").model
    before = resident_weight_bytes(two)
    with pytest.raises(PipelineError, match="2 layers cannot be split over 3 ranks"):
        pipeline_split(two, FakeGroup(0, 3))
    with pytest.raises(PipelineError, match="at least 2 ranks, the group has 1"):
        pipeline_split(two, mx.distributed.init())  # one process: a group of one
    assert len(two.layers) == 2 and resident_weight_bytes(two) == before
    gemma = load_model(make_tiny_model(tmp_path / "g", arch="gemma3", layers=4), "g", "fp32")
    with pytest.raises(PipelineError, match="gemma3_text' mixes layer kinds"):
        pipeline_split(gemma.model, FakeGroup(1, 2))
    with pytest.raises(PipelineError, match="'Linear' has no `layers` list"):
        pipeline_split(nn.Linear(4, 4), FakeGroup(1, 2))
    with pytest.raises(PipelineError, match="no token embedding"):
        pipeline_split(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), FakeGroup(1, 2))


def test_a_rank_reads_its_own_layers_only(tmp_path: Path) -> None:
    """Cut as the loader builds the model (registry.prepare_model), finished once loaded."""
    from models.pipeline import PipelineSplit
    from models.registry import ModelRegistry

    make_tiny_model(tmp_path / "tiny", layers=5)
    whole = load_model(tmp_path / "tiny", "tiny", "fp32").model.model
    embed, norm = _bytes(whole.embed_tokens.parameters()), _bytes(whole.norm.parameters())
    per_layer = _bytes(whole.layers[0].parameters())
    registry = ModelRegistry(tmp_path)
    split = PipelineSplit(FakeGroup(1, 2))
    registry.prepare_model = split.cut
    loaded = registry.acquire("tiny")
    # Loaded: its 3 layers, and the embedding until `finish` has read its dtype.
    assert loaded.weight_bytes == embed + norm + 3 * per_layer
    assert len(loaded.model.layers) == 3
    stage = split.finish(loaded.model)
    assert stage.weight_bytes == 3 * per_layer and stage.layers == range(2, 5)
    x = loaded.model.model.embed_tokens(mx.array([[5, 6]]))
    assert x.shape == (1, 2, 64) and x.dtype == mx.float32
