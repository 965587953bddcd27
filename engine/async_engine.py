"""AsyncEngine: the engine behind EngineAPI. One engine thread owns MLX; callers await queues."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.api import EngineAPI, ModelHandle
from engine.core import EngineCore, StepOutput
from engine.detokenizer import Detokenizer
from engine.doctor import doctor
from engine.embeddings import embed_tokens
from engine.engine_thread import EngineThread
from engine.errors import (
    ContextLengthError,
    EngineShuttingDownError,
    InvalidRequestError,
)
from engine.kv_manager import KVManager
from engine.output.events import OutputDelta
from engine.output.pipeline import OutputPipeline, decoder_for
from engine.prefix_cache import PrefixCache
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.structured import prepare_output
from engine.types import (
    EngineConfig,
    EngineStats,
    FinishReason,
    GenerateRequest,
    ModelStatus,
    RequestMetrics,
    RequestOutput,
)
from engine.validation import check_embedding_inputs, check_generate_request

log = logging.getLogger("mlxd.engine")


class AsyncEngine(EngineAPI):
    """The real engine: a model registry, one EngineCore per loaded model, one engine thread."""

    def __init__(self, config: EngineConfig, registry: Any = None):
        from models.registry import ModelRegistry

        self.config = config
        self.registry = registry or ModelRegistry(
            config.models_dir,
            memory_limit=config.memory_limit,
            weights_on_cpu=config.weights_on_cpu,
            default_keep_alive=config.keep_alive,
            pinned=config.pinned,
        )
        limit = self.registry.memory_limit
        self.kv = KVManager(int(limit * config.kv_fraction))
        self.registry.kv_bytes_fn = lambda: self.kv.used_bytes
        self.cores: dict[str, EngineCore] = {}
        self._owner: dict[str, tuple[str, EngineCore]] = {}  # request id -> (model, core)
        self._sinks: dict[str, Callable[[StepOutput], None]] = {}
        self._thread = EngineThread(self._step_all, self._housekeeping, _settle_mlx)
        self._accepting = True
        self._shutdown: asyncio.Future[None] | None = None
        self._snapshot = EngineStats(kv_budget_bytes=self.kv.budget_bytes)

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:  # type: ignore[override]
        return self._thread.alive and self._accepting

    async def start(self) -> None:
        self.registry.apply_mlx_limits()
        report = await asyncio.to_thread(doctor, True)
        blas = report.blas_name + (f" ({report.blas_note})" if report.blas_note else "")
        log.info(
            "MLX %s on %s; BLAS %s; fp32 matmul %.0f GFLOP/s; memory limit %.1f GB (KV %.1f GB)",
            report.mlx_version,
            report.device,
            blas,
            report.gflops or 0.0,
            self.registry.memory_limit / 1e9,
            self.kv.budget_bytes / 1e9,
        )
        self._thread.start()
        await asyncio.to_thread(self._ensure_default)
        for name in self.config.preload:
            await self.get_model(name)

    def _ensure_default(self) -> None:
        name = self.config.default_model
        step: list[int] = []

        def progress(done: int, total: int, what: str) -> None:
            pct = 100 * done // max(total, 1)
            if not step:  # called only when the model has to be imported
                log.info("importing the bundled model %s into %s ...", name, self.config.models_dir)
                step.append(0)
            if pct >= step[0] + 25 or done == total:  # a line every quarter
                step[0] = pct
                log.info("importing %s: %d%% (%d/%d tensors)", name, pct, done, total)

        try:
            self.registry.ensure_default(name, progress)
        except Exception as e:  # serving other models still works; say why the default is missing
            log.warning("default model %s unavailable: %s", name, e)

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        # Idempotent: a signal handler and the lifespan may both ask; both await one drain.
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain_and_stop(drain_timeout))
        await asyncio.shield(self._shutdown)

    async def _drain_and_stop(self, drain_timeout: float) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._owner and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._thread.alive:
            await self._thread.call(self._abort_everything)
            await self._thread.call(self._unload_all)
        await asyncio.to_thread(self._thread.stop)

    def _abort_everything(self) -> None:
        for core in self.cores.values():
            core.abort_all(FinishReason.ABORT)

    def _unload_all(self) -> None:
        for name in list(self.cores):
            self._drop_core(name)
        self.registry.unload_all()

    # --- the engine thread's loop body ----------------------------------------------------------
    def _step_all(self) -> bool:
        busy = False
        for name, core in list(self.cores.items()):
            if not core.has_work:
                continue
            busy = True
            try:
                core.step()
            except Exception:  # a failed step fails that model's requests, not the server
                log.exception("step failed for model %s", name)
                core.abort_all(FinishReason.ERROR)
                self._drop_core(name)
        if busy:
            self._snapshot = self._take_snapshot()
        return busy

    def _housekeeping(self) -> None:
        self._snapshot = self._take_snapshot()
        self.registry.evict_expired()
        loaded = {m.name: m.model for m in self.registry.loaded()}
        for name, core in list(self.cores.items()):
            if loaded.get(name) is not core.runner.model and not core.has_work:
                self._drop_core(name)

    def _drop_core(self, name: str) -> None:
        core = self.cores.pop(name, None)
        if core is not None and core.runner.prefix_cache is not None:
            core.runner.prefix_cache.clear()

    def _core_for(self, loaded: Any) -> EngineCore:
        core = self.cores.get(loaded.name)
        if core is not None and core.runner.model is loaded.model:
            return core
        # max_context caps the KV kept, not the conversation: past it a rotating cache keeps
        # the most recent tokens and generation goes on.
        window = self.config.max_context
        window = window if 0 < window < loaded.context_length else 0
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_waiting=self.config.max_waiting,
            kv_bytes_per_token=loaded.kv_bytes_per_token(),
            context_length=loaded.context_length,
            kv_window=window,
        )
        prefix = PrefixCache(self.config.prefix_cache_bytes)
        make_cache = (lambda: loaded.make_cache(window)) if window else loaded.make_cache
        runner = ModelRunner(loaded.model, make_cache, prefix)
        scheduler = Scheduler(scheduler_config, self.kv, prefix.lookup)
        tok = loaded.tokenizer
        core = EngineCore(
            scheduler, runner, set(loaded.eos_token_ids), self._emit, tok.id_to_token_text
        )
        self.cores[loaded.name] = core
        return core

    # --- models -----------------------------------------------------------------------------------
    def _status(self, entry: Any) -> ModelStatus:
        st = self.registry.status(entry.name)
        return ModelStatus(
            name=entry.name,
            architecture=entry.architecture,
            parameters=entry.parameters,
            context_length=entry.context_length,
            quantization=entry.quantization,
            size_bytes=entry.size_bytes,
            modified_at=entry.modified_at,
            family=entry.family,
            digest=entry.digest,
            loaded=st.loaded,
            weight_bytes=st.weight_bytes,
            weight_format=st.weight_format,
            expires_at=st.expires_at,
            active_requests=st.refcount,
        )

    def list_models(self) -> list[ModelStatus]:
        return [self._status(e) for e in self.registry.list_models()]

    def knows_model(self, name: str) -> bool:
        """On disk, or a bundled model the registry can import offline (the default one)."""
        return bool(self.registry.knows(name))

    def model_status(self, name: str) -> ModelStatus:
        return self._status(self.registry.resolve(name))

    def running_models(self) -> list[ModelStatus]:
        return [self.model_status(m.name) for m in self.registry.loaded()]

    async def get_model(self, name: str, keep_alive: float | None = None) -> ModelHandle:
        self._check_accepting()

        def load() -> Any:
            loaded = self._acquire(name, keep_alive)
            self.registry.release(loaded.name, keep_alive)
            self._core_for(loaded)
            return loaded

        t0, loads = time.monotonic(), self.registry.load_count
        loaded = await self._thread.call(load)
        load_time = time.monotonic() - t0 if self.registry.load_count != loads else 0.0
        return ModelHandle(loaded.name, self.model_status(loaded.name), loaded.tokenizer, load_time)

    async def unload_model(self, name: str) -> None:
        canonical = self.registry.resolve(name).name

        def unload() -> None:
            if self.registry.unload(canonical):
                self._drop_core(canonical)

        await self._thread.call(unload)

    async def import_gguf(self, path: str, name: str, progress: Any = None) -> ModelStatus:
        entry = await asyncio.to_thread(self.registry.import_gguf, path, name, progress)
        return self._status(entry)

    async def import_folder(self, path: str, name: str) -> ModelStatus:
        entry = await asyncio.to_thread(self.registry.import_folder, path, name)
        return self._status(entry)

    async def pull_model(self, name: str, progress: Any = None) -> ModelStatus:
        entry = await asyncio.to_thread(self.registry.pull, name, None, progress)
        return self._status(entry)

    async def copy_model(self, src: str, dst: str) -> None:
        await asyncio.to_thread(self.registry.copy, src, dst)

    async def delete_model(self, name: str) -> None:
        canonical = self.registry.resolve(name).name
        await self._thread.call(lambda: self.registry.unload(canonical))
        await asyncio.to_thread(self.registry.delete, canonical)

    # --- inference --------------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if not self._accepting:
            raise EngineShuttingDownError()

    def _acquire(self, name: str, keep_alive: float | None) -> Any:
        """The registry's acquire, with a log line when it had to load the weights."""
        before = self.registry.load_count
        t0 = time.monotonic()
        loaded = self.registry.acquire(name, keep_alive)
        if self.registry.load_count != before:
            log.info(
                "loaded %s in %.1f s: %s, %.0f MB",
                loaded.name,
                time.monotonic() - t0,
                loaded.weight_format,
                loaded.weight_bytes / 1e6,
            )
        return loaded

    def _submit(self, req: GenerateRequest, sink: Callable[[StepOutput], None]) -> Any:
        loaded = self._acquire(req.model, req.keep_alive)
        try:
            core = self._core_for(loaded)
            ctx = core.scheduler.config.context_length
            n_prompt = len(req.prompt_token_ids)
            if n_prompt == 0:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            check_generate_request(req, loaded.vocab_size)
            if n_prompt + req.params.max_tokens > ctx:
                raise ContextLengthError(n_prompt, req.params.max_tokens, ctx)
            seq = Sequence(req)
            seq.metrics.prompt_tokens = n_prompt
            self._sinks[req.request_id] = sink
            core.add(seq)
        except BaseException:
            self._sinks.pop(req.request_id, None)
            self.registry.release(loaded.name, req.keep_alive)
            raise
        self._owner[req.request_id] = (loaded.name, core)
        return loaded

    def _emit(self, seq: Sequence, out: StepOutput) -> None:
        sink = self._sinks.get(seq.id)
        if out.finish_reason is not None:
            self._sinks.pop(seq.id, None)
            owner = self._owner.pop(seq.id, None)
            if owner is not None:
                self.registry.release(owner[0], seq.request.keep_alive)
        if sink is not None:
            sink(out)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:  # type: ignore[override]
        self._check_accepting()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StepOutput] = asyncio.Queue()

        def sink(out: StepOutput) -> None:
            loop.call_soon_threadsafe(q.put_nowait, out)

        t0 = time.monotonic()
        plan = None
        spec = request.output
        if spec is not None and (spec.calls_tools or spec.json_schema is not None):
            # Grammars compile here, off the engine thread, before the request is queued.
            handle = await self.get_model(request.model, request.keep_alive)
            plan = await asyncio.to_thread(prepare_output, handle.tokenizer, request)
        loaded = await self._thread.call(lambda: self._submit(request, sink))
        if spec is not None and plan is None:  # reasoning only: cheap, nothing to compile
            plan = prepare_output(loaded.tokenizer, request)
        load_time = time.monotonic() - t0
        rid = request.request_id
        hidden = set(loaded.eos_token_ids) | set(request.params.stop_token_ids)
        decode = decoder_for(plan, loaded.tokenizer.decode, hidden)
        pipe = OutputPipeline(
            Detokenizer(decode, request.prompt_token_ids, request.params.stop), plan
        )
        done = False
        try:
            while True:
                out = await q.get()
                delta = pipe.add(out.token_ids)
                if pipe.stopped is not None:
                    done = True
                    self._thread.post(lambda: self._abort_on_thread(rid))
                    delta.extend(pipe.finish_stopped())
                    yield self._final(rid, delta, out, FinishReason.STOP, pipe.stopped, load_time)
                    return
                if out.finish_reason is not None:
                    done = True
                    delta.extend(pipe.flush())
                    stop = (
                        out.token_ids[-1]
                        if out.finish_reason is FinishReason.STOP and out.token_ids
                        else None
                    )
                    yield self._final(rid, delta, out, out.finish_reason, stop, load_time)
                    return
                if delta or out.logprobs or out.prompt_logprobs:
                    yield RequestOutput(
                        rid,
                        delta.content,
                        delta.reasoning,
                        delta.tool_calls,
                        out.token_ids,
                        out.logprobs,
                        prompt_logprobs=out.prompt_logprobs,
                    )
        finally:
            if not done:
                self._thread.post(lambda: self._abort_on_thread(rid))

    def _final(
        self,
        rid: str,
        delta: OutputDelta,
        out: StepOutput,
        reason: FinishReason,
        stop: str | int | None,
        load_time: float,
    ) -> RequestOutput:
        metrics = out.metrics or RequestMetrics()
        metrics.load_time = load_time
        return RequestOutput(
            rid,
            delta.content,
            delta.reasoning,
            delta.tool_calls,
            out.token_ids,
            out.logprobs,
            prompt_logprobs=out.prompt_logprobs,
            finish_reason=reason,
            stop_matched=stop,
            metrics=metrics,
            error=out.error,
        )

    def _abort_on_thread(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            owner[1].abort(request_id)
            self._owner.pop(request_id, None)
            self._sinks.pop(request_id, None)
            self.registry.release(owner[0], None)

    async def abort(self, request_id: str) -> None:
        self._thread.post(lambda: self._abort_on_thread(request_id))

    async def embed(self, model: str, inputs: list[list[int]]) -> list[list[float]]:
        self._check_accepting()

        def run() -> list[list[float]]:
            loaded = self.registry.acquire(model, None)
            try:
                check_embedding_inputs(inputs, loaded.vocab_size)
                return [embed_tokens(loaded.model, ids) for ids in inputs]
            finally:
                self.registry.release(loaded.name, None)

        return await self._thread.call(run)

    def _take_snapshot(self) -> EngineStats:
        """Counts read on the engine thread between steps; stats() serves the latest copy."""
        cores = list(self.cores.values())
        prefix = [c.runner.prefix_cache for c in cores if c.runner.prefix_cache is not None]
        rejections: dict[str, int] = {}
        for c in cores:
            for k, v in c.scheduler.rejections.items():
                rejections[k] = rejections.get(k, 0) + v
        return EngineStats(
            running=sum(len(c.scheduler.running) for c in cores),
            waiting=sum(len(c.scheduler.waiting) for c in cores),
            kv_bytes=sum(c.runner.kv_bytes() for c in cores),
            kv_budget_bytes=self.kv.budget_bytes,
            prefix_cache_bytes=sum(p.nbytes for p in prefix),
            prefix_cache_hits=sum(p.hits for p in prefix),
            prefix_cache_queries=sum(p.queries for p in prefix),
            steps=sum(c.steps for c in cores),
            rejections=rejections,
        )

    def stats(self) -> EngineStats:
        import mlx.core as mx

        snap = self._snapshot
        return dataclasses.replace(
            snap,
            mlx_active_bytes=mx.get_active_memory(),
            mlx_peak_bytes=mx.get_peak_memory(),
            mlx_cache_bytes=mx.get_cache_memory(),
            loaded=self.running_models(),
        )


def _settle_mlx() -> None:
    """Wait for queued MLX work before the engine thread ends: work still running when the
    interpreter exits tears down MLX's worker threads mid-task (std::terminate)."""
    import mlx.core as mx

    mx.synchronize()
