"""The async side: a stream whose text processing fails ends alone; loads and embeddings of
another model run off the engine thread."""

import asyncio
import threading

from engine.async_engine import AsyncEngine
from engine.types import EngineConfig, FinishReason, GenerateRequest, SamplingParams
from server.settings import engine_config, load_settings
from tests.tiny import make_tiny_model


def config(models_dir, default_model: str) -> EngineConfig:
    """The shipped defaults, over these models and a 1 GiB memory limit."""
    return engine_config(
        load_settings(
            None, models_dir=models_dir, default_model=default_model, memory_limit=1 << 30
        )
    )


def request(rid: str, prompt: list[int]) -> GenerateRequest:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return GenerateRequest(rid, "t", prompt, params)


async def run(engine: AsyncEngine, req: GenerateRequest) -> tuple[str, FinishReason | None]:
    text, reason = "", None
    async for out in engine.generate(req):
        text += out.text
        reason = out.finish_reason
    return text, reason


async def test_a_failing_detokenizer_ends_its_stream_only(tmp_path):
    make_tiny_model(tmp_path / "t")
    engine = AsyncEngine(config(tmp_path, "t"))
    engine._thread.start()  # the engine thread alone: no startup probe, no default import
    try:
        tok = (await engine.get_model("t")).tokenizer
        good = [request(f"g{i}", [10 + i, 40 + i, 70 + i]) for i in range(3)]
        alone = [await run(engine, r) for r in good]
        # A decode that fails on one token id only the bad request's prompt holds.
        used = {t for r in good for t in r.prompt_token_ids} | set(
            tok.encode("".join(text for text, _ in alone))
        )
        mark = next(t for t in range(200, 300) if t not in used)
        real_decode = tok.decode

        def decode(ids, *args, **kwargs):
            if mark in ids:
                raise ValueError("injected detokenizer fault")
            return real_decode(ids, *args, **kwargs)

        tok.decode = decode
        bad = request("bad", [11, 41, mark])
        results = await asyncio.gather(*(run(engine, r) for r in [good[0], bad, *good[1:]]))
        assert results[1] == ("", FinishReason.ERROR)
        assert [results[0], *results[2:]] == alone
        assert all(reason is FinishReason.LENGTH for _, reason in alone)
        assert engine.stats().failed_requests == 1
        for _ in range(100):  # the abort the failed stream posted reaches the engine thread
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().running == 0
    finally:
        await engine.shutdown(drain_timeout=1.0)


class SlowLoads:
    """A registry whose loads of model 'b' wait until the test lets them go."""

    def __init__(self, registry):
        self.registry = registry
        self.loading = threading.Event()
        self.go = threading.Event()

    def acquire(self, name, keep_alive=None):
        if name.startswith("b"):
            self.loading.set()
            assert self.go.wait(60), "never let go"
        return self.registry.acquire(name, keep_alive)

    def __getattr__(self, name):
        return getattr(self.registry, name)


async def test_loads_and_embeddings_of_another_model_never_stall_streams(tmp_path):
    from models.registry import ModelRegistry

    for name in ("a", "b"):
        make_tiny_model(tmp_path / name)
    slow = SlowLoads(ModelRegistry(tmp_path, memory_limit=1 << 30))
    engine = AsyncEngine(config(tmp_path, "a"), registry=slow)
    engine._thread.start()
    try:
        params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        stream = engine.generate(GenerateRequest("s", "a", [5, 6, 7], params))
        await anext(stream)
        for blocked in (engine.get_model("b"), engine.embed("b", [[1, 2, 3]])):
            slow.loading.clear()
            task = asyncio.ensure_future(blocked)
            await asyncio.to_thread(slow.loading.wait, 60)
            # 'b' is loading, held: 'a' must keep streaming meanwhile.
            for _ in range(5):
                await asyncio.wait_for(anext(stream), 30)
            slow.go.set()
            await task
            slow.go.clear()
        async for _ in stream:
            pass
    finally:
        slow.go.set()
        await engine.shutdown(drain_timeout=1.0)


async def test_requests_to_a_loaded_model_read_no_metadata(tmp_path):
    from models.registry import ModelRegistry

    make_tiny_model(tmp_path / "a")
    registry = ModelRegistry(tmp_path, memory_limit=1 << 30)
    reads: list[str] = []
    resolve = registry.resolve
    registry.resolve = lambda name: reads.append(name) or resolve(name)  # type: ignore[method-assign]
    engine = AsyncEngine(config(tmp_path, "a"), registry=registry)
    engine._thread.start()
    try:
        await engine.get_model("a")
        assert reads  # the load read the folder once
        reads.clear()
        for i in range(3):
            handle = await engine.get_model("a")
            assert handle.status.loaded and handle.context_length > 0
            await run(
                engine, GenerateRequest(f"r{i}", "a", [5, 6, 7], SamplingParams(max_tokens=4))
            )
        assert reads == []
    finally:
        await engine.shutdown(drain_timeout=1.0)


async def test_a_row_failing_before_its_first_token_gets_the_status_of_its_fault(
    tmp_path, monkeypatch
):
    """The real engine behind the app: a row that fails before its first token answers 400 when
    its own parameters broke it, 500 (with the engine's message) when the engine did, 503 when
    the batch's shared pass failed; streamed or not, in the API's error shape."""
    import httpx

    import engine.pending
    from engine.runner import ModelRunner
    from engine.sampling import RowState
    from server.app import create_app

    make_tiny_model(tmp_path / "t")
    settings = load_settings(None, models_dir=tmp_path, default_model="t", memory_limit=1 << 30)
    eng = AsyncEngine(engine_config(settings))
    eng._thread.start()
    create, sample, decode = RowState.create.__func__, engine.pending.sample, ModelRunner._decode

    def bad_seed(cls, params, prompt_ids):
        if params.seed == 1:
            raise ValueError("no key for this seed")
        return create(cls, params, prompt_ids)

    def bad_sampler(logits, rows, bitmask=None):
        if any(r.params.seed == 2 for r in rows):
            raise RuntimeError("injected sampler fault")
        return sample(logits, rows, bitmask)

    def bad_pass(self, scheduled, step):
        if any(s.seq.params.seed == 3 for s in scheduled):
            raise RuntimeError("injected forward-pass fault")
        return decode(self, scheduled, step)

    monkeypatch.setattr(RowState, "create", classmethod(bad_seed))
    monkeypatch.setattr(engine.pending, "sample", bad_sampler)
    monkeypatch.setattr(ModelRunner, "_decode", bad_pass)
    app = create_app(settings.model_copy(update={"host": "0.0.0.0"}), eng)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for seed, status, message in [
                (1, 400, "sampling parameters"),
                (2, 500, "the engine failed on this request"),
                (3, 503, "retry"),
                (4, 200, None),
            ]:
                for stream in (False, True):
                    body = {"model": "t", "prompt": [11, 41, 71], "max_tokens": 3, "seed": seed}
                    r = await client.post("/v1/completions", json={**body, "stream": stream})
                    assert r.status_code == status, (seed, stream, r.text)
                    if message is not None:
                        err = r.json()["error"]
                        assert message in err["message"] and err["code"], err
            eng._thread.failed = RuntimeError("the engine thread died")  # as _run records it
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
            eng._thread.failed = None
    finally:
        await eng.shutdown(drain_timeout=1.0)


async def test_after_startup_full_collections_walk_only_the_models_objects(tmp_path):
    """A full collection walks every object it tracks holding the GIL (75-190 ms with the
    server's imports: every stream stalls). Startup freezes what the imports made; a loaded
    model's objects stay tracked, few, and collectable once it is unloaded."""
    import gc
    import weakref

    from engine.model_manager import freeze_heap

    make_tiny_model(tmp_path / "t")
    engine = AsyncEngine(config(tmp_path, "t"))
    engine._thread.start()
    gc.collect()
    freeze_heap()  # as start() does
    try:
        handle = await engine.get_model("t")
        (runner,) = engine.models.runners.values()
        tracked = {id(o) for o in gc.get_objects()}
        assert id(runner.model) in tracked and id(handle.tokenizer.hf) in tracked
        assert len(tracked) < 20_000
        tokenizer = weakref.ref(handle.tokenizer.hf)
        await engine.unload_model("t")
        del handle, runner
        gc.collect()
        assert tokenizer() is None  # an unloaded model's cycles are still collected
    finally:
        gc.unfreeze()
        await engine.shutdown(drain_timeout=1.0)


async def test_a_load_gives_the_heaps_free_pages_back_once(tmp_path):
    make_tiny_model(tmp_path / "t")
    engine = AsyncEngine(config(tmp_path, "t"))
    trims: list[str] = []
    # glibc's malloc_trim, counted with the thread it ran on
    engine.memory._trim = lambda: trims.append(threading.current_thread().name)
    engine._thread.start()
    try:
        for _ in range(3):
            await engine.get_model("t")
        assert len(trims) == 1  # after the load (its tokenizer's parse), not at every request
        assert trims != [
            "mlxd-engine"
        ]  # the first trim after a load takes ~8 ms: not between steps
    finally:
        await engine.shutdown(drain_timeout=1.0)
