"""The token-id check at the engine's boundary, property-tested on the real AsyncEngine.

A tiny random llama (vocabulary 300) is served by the real AsyncEngine and registry: random ids,
negatives, the vocabulary edge and huge integers either get InvalidRequestError naming the field
(before anything reaches MLX) or run, and the engine keeps serving either way. Seeds anywhere in
the signed and unsigned 64-bit ranges run too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models  # noqa: F401  (BLAS before mlx)
from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequestError
from engine.types import FinishReason, GenerateRequest, SamplingParams
from engine.validation import check_token_ids
from server.settings import engine_config, load_settings
from tests.tiny import make_tiny_model

VOCAB = 300
MODEL = "tiny:1"
EXAMPLES = int(os.environ.get("MLXD_FUZZ_EXAMPLES", "25"))
# Ids around the edges that matter: negatives, the last valid id, one past it, int32 and beyond.
IDS = st.one_of(
    st.integers(0, VOCAB - 1),
    st.integers(-3, VOCAB + 3),
    st.sampled_from([-(2**63), -1, VOCAB - 1, VOCAB, 2**31 - 1, 2**31, 2**32, 2**63, 2**64]),
)
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def _valid(ids: list[int]) -> bool:
    return all(0 <= i < VOCAB for i in ids)


@PROPS
@given(st.lists(st.one_of(IDS, st.booleans(), st.floats(allow_nan=False)), max_size=12))
def test_check_token_ids_accepts_exactly_the_vocabulary(ids: list) -> None:
    ok = all(type(i) is int and 0 <= i < VOCAB for i in ids)
    if ok:
        check_token_ids(ids, VOCAB, "prompt", "the prompt")
    else:
        with pytest.raises(InvalidRequestError) as e:
            check_token_ids(ids, VOCAB, "prompt", "the prompt")
        assert e.value.param == "prompt" and str(VOCAB - 1) in str(e.value)


class Served:
    """The real engine over the tiny model, on one event loop the tests drive."""

    def __init__(self, models_dir: Path):
        make_tiny_model(models_dir / "tiny--1", vocab=VOCAB)
        self.loop = asyncio.new_event_loop()
        settings = load_settings(models_dir=models_dir, default_model=MODEL)
        self.engine = AsyncEngine(engine_config(settings))
        self.run(self.engine.start())
        self.n = 0

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def generate(self, ids: list[int], **params) -> list[int]:  # type: ignore[no-untyped-def]
        self.n += 1
        req = GenerateRequest(
            f"r{self.n}", MODEL, ids, SamplingParams(max_tokens=2, ignore_eos=True, **params)
        )

        async def collect() -> list[int]:
            out: list[int] = []
            async for o in self.engine.generate(req):
                assert o.finish_reason is not FinishReason.ERROR, o.error
                out += o.token_ids
            return out

        return self.run(collect())

    def close(self) -> None:
        self.run(self.engine.shutdown(drain_timeout=1.0))
        self.loop.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("models"))
    yield s
    s.close()


@PROPS
@given(ids=st.lists(IDS, min_size=1, max_size=8))
def test_prompt_ids(served: Served, ids: list[int]) -> None:
    if _valid(ids):
        assert served.generate(ids, temperature=0.0)
    else:
        with pytest.raises(InvalidRequestError) as e:
            served.generate(ids)
        assert e.value.param == "prompt"


@PROPS
@given(keys=st.lists(IDS, min_size=1, max_size=4))
def test_logit_bias_keys(served: Served, keys: list[int]) -> None:
    bias = {k: 1.0 for k in keys}
    if _valid(keys):
        assert served.generate([1, 2], logit_bias=bias)
    else:
        with pytest.raises(InvalidRequestError) as e:
            served.generate([1, 2], logit_bias=bias)
        assert e.value.param == "logit_bias"


@PROPS
@given(inputs=st.lists(st.lists(IDS, max_size=6), min_size=1, max_size=3))
def test_embedding_inputs(served: Served, inputs: list[list[int]]) -> None:
    if all(x and _valid(x) for x in inputs):
        vectors = served.run(served.engine.embed(MODEL, inputs))
        assert len(vectors) == len(inputs)
    else:
        with pytest.raises(InvalidRequestError) as e:
            served.run(served.engine.embed(MODEL, inputs))
        assert e.value.param == "input"


@pytest.mark.parametrize("seed", [-1, 0, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, 3**50])
def test_any_integer_seed_samples(served: Served, seed: int) -> None:
    first = served.generate([5, 6, 7], temperature=1.0, seed=seed)
    assert first == served.generate([5, 6, 7], temperature=1.0, seed=seed)
    assert SamplingParams(seed=seed).seed == seed % 2**64


@pytest.mark.parametrize("window", [10**12, 2**63, 2**31])
def test_a_penalty_window_past_any_context_is_the_whole_context(
    served: Served, window: int
) -> None:
    params = {"repetition_penalty": 1.3, "repeat_last_n": window, "temperature": 0.0}
    assert served.generate([5, 6, 7], **params) == served.generate(
        [5, 6, 7], **{**params, "repeat_last_n": -1}
    )


def test_engine_still_serves_after_refusals(served: Served) -> None:
    for bad in ([VOCAB], [-1], [2**64]):
        with pytest.raises(InvalidRequestError):
            served.generate(bad)
    assert served.engine.alive and served.generate([1, 2, 3], temperature=0.0)
