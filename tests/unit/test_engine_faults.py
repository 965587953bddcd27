"""Fault isolation in the step: a row's own failure ends that row only; a failure of the shared
pass ends the running rows, keeps the queue and the engine serving."""

import random

import pytest

from engine.types import FinishReason, GenerateRequest, SamplingParams
from tests.unit.engine_harness import EOS, Harness, tiny_llama


@pytest.fixture(scope="module")
def llama_model():
    return tiny_llama()


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, EOS - 1) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def request(i: int, p: list[int], **kw) -> GenerateRequest:
    params = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    params.update(kw)
    return GenerateRequest(f"r{i}", "m", p, SamplingParams(**params))  # type: ignore[arg-type]


def seeded(i: int, p: list[int]) -> GenerateRequest:
    return request(i, p, temperature=0.8, top_k=40, top_p=0.9, seed=100 + i)


def solo(model, req: GenerateRequest) -> list[int]:
    return Harness(model).run([req])[req.request_id]


def raising_after(n_prompt: int, n_tokens: int):
    """A sampler hook that fails once its row has generated `n_tokens` tokens."""

    def proc(token_ids, logits):
        if token_ids.shape[0] >= n_prompt + n_tokens:
            raise RuntimeError("injected sampler fault")
        return logits

    return proc


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-now", "read-a-step-late"])
def test_a_failing_sampler_fails_its_row_only(llama_model, pipelined):
    ps = prompts(4)
    reqs = [request(0, ps[0]), seeded(1, ps[1]), request(2, ps[2]), seeded(3, ps[3])]
    alone = {r.request_id: solo(llama_model, r) for r in reqs}
    bad = request(2, ps[2], logits_processors=[raising_after(len(ps[2]), 3)])
    h = Harness(llama_model, pipelined=pipelined)
    out = h.run([reqs[0], reqs[1], bad, reqs[3]])
    for rid in ("r0", "r1", "r3"):
        assert out[rid] == alone[rid]
        assert h.finals[rid].finish_reason is FinishReason.LENGTH
    failed = h.finals["r2"]
    assert failed.finish_reason is FinishReason.ERROR and failed.error
    assert failed.error.kind == "internal"  # the sampler hook is the server's, not the request's
    assert out["r2"] == alone["r2"][:3]  # what it streamed before its fault was right
    assert h.core.failed_rows == 1
    assert not h.scheduler.running and not h.runner.rows  # released, nothing leaked


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_outside_the_key_space_fails_its_row_only(llama_model, seed):
    ps = prompts(4, seed=4)
    reqs = [seeded(i, p) for i, p in enumerate(ps)]
    alone = {r.request_id: solo(llama_model, r) for r in reqs}
    reqs[1] = request(1, ps[1], temperature=0.8)
    reqs[1].params.seed = seed  # past any folding at the boundary: what the key can't take
    h = Harness(llama_model)
    out = h.run(reqs, every=1)  # the bad one joins while r0 decodes
    assert h.finals["r1"].finish_reason is FinishReason.ERROR
    assert h.finals["r1"].error.kind == "request"  # its own seed: a 400, not a 500
    assert out.get("r1", []) == []
    assert {rid: out[rid] for rid in ("r0", "r2", "r3")} == {
        rid: alone[rid] for rid in ("r0", "r2", "r3")
    }


class FlakyModel:
    """The tiny model, whose forward pass raises on chosen calls (a shared-pass fault)."""

    def __init__(self, model, fail_on: set[int]):
        self.model, self.fail_on, self.calls = model, fail_on, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("injected forward-pass fault")
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-now", "read-a-step-late"])
def test_a_failing_forward_pass_keeps_the_queue_and_the_engine(llama_model, pipelined):
    ps = prompts(5, seed=5)
    reqs = [request(i, p) for i, p in enumerate(ps)]
    alone = {r.request_id: solo(llama_model, r) for r in reqs}
    flaky = FlakyModel(llama_model, fail_on={6})
    h = Harness(flaky, max_num_seqs=2, budget=64, pipelined=pipelined)
    out = h.run(reqs[:4])
    # The two running when the pass failed end with an error; the queued two run as if alone.
    errors = {rid for rid, f in h.finals.items() if f.finish_reason is FinishReason.ERROR}
    assert errors == {"r0", "r1"}
    assert all(h.finals[rid].error.kind == "unavailable" for rid in errors)
    assert out["r2"] == alone["r2"] and out["r3"] == alone["r3"]
    assert h.core.failed_rows == 2
    # And it goes on serving new requests.
    assert h.run([reqs[4]])["r4"] == alone["r4"]
