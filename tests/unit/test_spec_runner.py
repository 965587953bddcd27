"""Speculative decoding on the real runner over tiny models: the per-row KV trim, and output
identical with and without drafts (greedy rows and seeded sampled rows in one batch: a sampled
row's draw at each verified position takes the uniform decoding one at a time takes there)."""

import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from engine import scheduler
from engine.outputs import ScheduledSeq
from engine.sampling import RowState
from engine.sequence import Sequence
from engine.speculative import BatchKVCache, sync_history, trimmable
from engine.types import GenerateRequest, SamplingParams
from tests.unit.engine_harness import EOS, Harness, tiny_gemma3, tiny_llama


def kv(length: int, seed: int) -> KVCache:
    c = KVCache()
    k = mx.random.normal((1, 2, length, 4), key=mx.random.key(seed))
    c.update_and_fetch(k, k + 1)
    return c


def test_trim_rows_cuts_each_row_by_its_own_count():
    a, b, c = kv(3, 0), kv(6, 1), kv(5, 2)
    batch = BatchKVCache.merge([a, b, c])
    new = mx.random.normal((3, 2, 4, 4), key=mx.random.key(9))
    batch.update_and_fetch(new, new + 1)
    batch.trim_rows([1, 3, 0])  # rows keep 3, 1 and 4 of the 4 new positions
    for i, (row, kept) in enumerate([(a, 3), (b, 1), (c, 4)]):
        want = mx.concatenate([row.keys[..., : row.offset, :], new[i : i + 1, :, :kept]], axis=2)
        got = batch.extract(i)
        assert got.offset == row.offset + kept
        assert mx.array_equal(got.keys, want) and mx.array_equal(got.values, want + 1)
    assert batch.offset.tolist() == [6, 7, 9]
    # It stays a working batch cache: the next positions land after each row's own.
    more = mx.ones((3, 2, 1, 4))
    batch.update_and_fetch(more, more)
    assert mx.array_equal(batch.extract(1).keys[..., -1:, :], more[1:2])
    batch.filter(mx.array([0, 2]))
    assert batch.offset.tolist() == [7, 10] and type(batch) is BatchKVCache


def test_an_empty_merge_keeps_the_trimmable_class():
    assert type(BatchKVCache.merge([KVCache(), KVCache()])) is BatchKVCache


@pytest.fixture(scope="module")
def llama_model():
    return tiny_llama()


@pytest.fixture
def every_draft(monkeypatch):
    """Verify every draft, whatever it costs: rows of a batch draft at once and widely."""
    monkeypatch.setattr(scheduler, "fit_width", lambda drafts, *args, **kw: max(drafts, default=0))


def requests() -> list[GenerateRequest]:
    """Greedy rows with repetitive prompts (a random model's greedy output loops too, so drafts
    hold and miss), one plain greedy row, and seeded sampled rows."""
    rng = random.Random(3)
    out = []
    for i in range(6):
        unit = [rng.randrange(1, EOS - 1) for _ in range(rng.randrange(3, 9))]
        prompt = unit * rng.randrange(2, 5) + [rng.randrange(1, EOS - 1) for _ in range(i)]
        if i < 4:
            params = SamplingParams(max_tokens=20 + 3 * i, temperature=0)
        else:
            params = SamplingParams(max_tokens=15, temperature=0.9, top_k=40, seed=i)
        out.append(GenerateRequest(f"r{i}", "m", prompt, params))
    return out


@pytest.mark.parametrize("pipelined", [False, True], ids=["read-now", "read-a-step-late"])
def test_speculation_changes_no_token(llama_model, pipelined, every_draft):
    plain = Harness(llama_model, pipelined=pipelined).run(requests(), every=2)
    h = Harness(llama_model, pipelined=pipelined)
    h.scheduler.config.speculative = "on"
    h.scheduler.drafter.max_tokens = 6
    spec = h.run(requests(), every=2)  # rows join and leave at different steps
    assert spec == plain
    s = h.scheduler
    assert s.accepted > 0 and s.drafted > s.accepted  # drafts held and missed
    assert h.kv.used_bytes == 0 and h.runner.batch is None


def sampled_requests() -> list[GenerateRequest]:
    """Seeded sampled rows (and logit-biased, penalized ones) on repetitive prompts; cool enough
    that a random model's output loops a little (so drafts hold and miss)."""
    kinds = [
        SamplingParams(temperature=0.05, seed=11),
        SamplingParams(temperature=0.1, top_k=20, top_p=0.9, seed=12),
        SamplingParams(temperature=0.4, min_p=0.1, logit_bias={7: 2.0}, seed=13),
        SamplingParams(temperature=0, logit_bias={5: 3.0, 9: -2.0}),
        SamplingParams(temperature=0.05, repetition_penalty=1.3, repeat_last_n=6, seed=14),
        SamplingParams(temperature=0, presence_penalty=0.4, frequency_penalty=0.3),
    ]
    rng = random.Random(5)
    out = []
    for i, params in enumerate(kinds):
        unit = [rng.randrange(1, EOS - 1) for _ in range(rng.randrange(3, 7))]
        params.max_tokens = 40
        out.append(GenerateRequest(f"s{i}", "m", unit * 4, params))
    return out


@pytest.mark.parametrize("every", [10, 50], ids=["together", "alone"])
@pytest.mark.parametrize("fused", [False, True], ids=["mlx", "cpu-kernels"])
def test_sampled_rows_draft_and_draw_the_tokens_they_draw_without(fused, every, every_draft):
    from models import qkernels

    model = tiny_llama(seed=2)
    if fused:
        from models.fused_block import fuse_blocks
        from models.fused_layers import fuse_for_cpu
        from models.fused_mlp import fuse_mlps
        from models.quant_layers import quantize_for_cpu

        if not qkernels.available():
            pytest.skip(f"mlxd kernels {qkernels.unavailable_reason()}")
        quantize_for_cpu(model, "q8")
        fuse_mlps(model)
        fuse_for_cpu(model), fuse_blocks(model)
    plain = Harness(model).run(sampled_requests(), every=every)
    h = Harness(model)
    h.scheduler.config.speculative = "on"
    h.scheduler.drafter.max_tokens = 4
    assert h.run(sampled_requests(), every=every) == plain
    assert h.scheduler.accepted > 0 and h.scheduler.drafted > h.scheduler.accepted
    assert h.kv.used_bytes == 0 and h.runner.batch is None


def test_a_penalized_rows_history_is_rebuilt_from_its_tokens_after_its_drafts():
    params = SamplingParams(temperature=0.7, repetition_penalty=1.2, seed=1)
    seq = Sequence(GenerateRequest("p", "m", [1, 2, 3], params))
    states = {"p": RowState.create(params, seq.prompt_ids)}
    drafting = ScheduledSeq(seq, 3, 3, True, draft=[4, 5])
    assert sync_history([drafting], states, set()) == {"p"}  # its drafts leave it stale
    seq.output_ids += [4, 5, 6]
    assert sync_history([], states, {"p"}) == {"p"}  # not scheduled (preempted): still stale
    plain = ScheduledSeq(seq, 1, 5, True)
    assert sync_history([plain], states, {"p"}) == set()
    assert mx.concatenate(states["p"].history).tolist() == [1, 2, 3, 4, 5, 6]
    assert sync_history([], {}, {"p"}) == set()  # gone


def test_sliding_window_models_do_not_speculate():
    assert not Harness(tiny_gemma3()).runner.trimmable
    assert Harness(tiny_llama()).runner.trimmable
    assert not trimmable([KVCache(), RotatingKVCache(max_size=16)])  # max_context set


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("stack", [False, True])
def test_speculation_changes_no_token_on_the_fused_cpu_layers(bits, stack, every_draft):
    """Drafts verified on the kernels as the loader sets them up (a few query positions through
    the layers' own sequence, or with the fused stack as its one op over them) give the tokens
    of decoding one at a time (fused blocks, fused stack)."""
    from models import qkernels
    from models.fused_block import fuse_blocks
    from models.fused_layers import fuse_for_cpu
    from models.fused_mlp import fuse_mlps
    from models.fused_stack import fuse_stacks
    from models.quant_layers import quantize_for_cpu

    if not qkernels.available():
        pytest.skip(f"mlxd kernels {qkernels.unavailable_reason()}")
    model = tiny_llama(seed=1)
    if bits == 4:
        nn.quantize(model, group_size=32, bits=4)
    quantize_for_cpu(model, "as_stored")
    fuse_mlps(model)
    assert fuse_for_cpu(model) > 0 and fuse_blocks(model) > 0
    assert not stack or fuse_stacks(model) == 1
    plain = Harness(model).run(requests(), every=2)
    h = Harness(model)
    h.scheduler.config.speculative = "on"
    h.scheduler.drafter.max_tokens = 5
    assert h.run(requests(), every=2) == plain
    assert h.scheduler.accepted > 0


def test_auto_speculates_on_the_cpu_where_attention_verifies_drafts_on_the_kernel():
    from models import qkernels
    from models.fused_layers import fuse_for_cpu

    if mx.default_device() == mx.gpu:
        pytest.skip("on a GPU every model verifies drafts cheaply")
    from models.quant_layers import quantize_for_cpu

    assert not Harness(tiny_llama()).runner.cheap_positions  # MLX's SDPA: a step per draft
    model = tiny_llama()
    fuse_for_cpu(model)
    assert not Harness(model).runner.cheap_positions  # fp32 projections: BLAS GEMMs
    quantize_for_cpu(model, "q8")
    assert Harness(model).runner.cheap_positions == qkernels.available()
