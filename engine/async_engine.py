"""AsyncEngine: the engine behind EngineAPI. One engine thread owns MLX; callers await queues."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.api import EngineAPI, ModelHandle
from engine.detokenizer import Detokenizer
from engine.doctor import doctor
from engine.embeddings import embed_tokens
from engine.engine_thread import EngineThread
from engine.errors import (
    ContextLengthError,
    EngineShuttingDownError,
    EngineUnavailableError,
    InvalidRequestError,
)
from engine.kv_manager import KVManager
from engine.memory import MemoryGovernor, settle_mlx
from engine.model_manager import ModelManager, freeze_heap
from engine.output.events import OutputDelta
from engine.output.pipeline import OutputPipeline, decoder_for
from engine.outputs import ROW_FAILED, StepOutput
from engine.sequence import Sequence
from engine.streams import Sink, Streams
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
        self.memory = MemoryGovernor(config.mlx_cache_limit, config.idle_release, limit // 8)
        self.streams = Streams(self.registry.release)
        self._thread = EngineThread(
            self._step_all, self._housekeeping, settle_mlx, self.streams.flush
        )
        self.models = ModelManager(
            config, self.registry, self.kv, self.memory, self._thread, self.streams.emit
        )
        self.registry.generating_fn = self.models.generating
        self._accepting = True
        self._shutdown: asyncio.Future[None] | None = None
        self._snapshot = EngineStats(kv_budget_bytes=self.kv.budget_bytes)
        self._failed_streams = 0  # requests whose output failed on the async side (detokenizer)
        self._embedding = threading.Lock()  # one embedding batch at a time bounds its memory

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:  # type: ignore[override]
        return self._thread.alive and self._accepting

    def _limit_memory(self) -> None:
        """MLX's memory limits and the buffer-cache governor, before any model loads."""
        self.registry.apply_mlx_limits()
        self.memory.start()

    async def start(self) -> None:
        self._limit_memory()
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
        await asyncio.to_thread(self.models.ensure_default)
        for name in self.config.preload:
            await self.get_model(name)
        freeze_heap()  # what the imports made: full collections walk the models' objects only

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        # Idempotent: a signal handler and the lifespan may both ask; both await one drain.
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain_and_stop(drain_timeout))
        await asyncio.shield(self._shutdown)

    async def _drain_and_stop(self, drain_timeout: float) -> None:
        await self._drain(drain_timeout)
        await asyncio.to_thread(self._thread.stop)

    async def _drain(self, drain_timeout: float) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._thread.alive:
            await self._thread.call(self._abort_everything)
            await self._thread.call(self.models.unload_all)

    def _abort_everything(self) -> None:
        for core in self.models.cores.values():
            core.abort_all(FinishReason.ABORT)

    # --- the engine thread's loop body ----------------------------------------------------------
    def _step_all(self) -> bool:
        busy = False
        self.memory.prefilling(self.models.prefilling(), self.models.held_bytes())
        for name, core in list(self.models.cores.items()):
            if not core.has_work:
                continue
            busy = True
            try:
                core.step()  # handles a request's failure itself
            except Exception:  # our bug in the recovery: log it, keep every model's queue
                log.exception("step failed for model %s", name)
            self.streams.flush()  # this model's tokens go now, not after the other models' steps
        if busy:
            self.memory.busy()
            self._snapshot = self._take_snapshot()
        return busy

    def _housekeeping(self) -> None:
        self._snapshot = self._take_snapshot()
        self.models.housekeeping()
        self.memory.tick()

    # --- models: the manager's -------------------------------------------------------------------
    def list_models(self) -> list[ModelStatus]:
        return self.models.list_models()

    def knows_model(self, name: str) -> bool:
        return self.models.knows_model(name)

    def model_status(self, name: str) -> ModelStatus:
        return self.models.model_status(name)

    def running_models(self) -> list[ModelStatus]:
        return self.models.running_models()

    async def get_model(self, name: str, keep_alive: float | None = None) -> ModelHandle:
        self._check_accepting()
        return await self.models.get_model(name, keep_alive)

    async def unload_model(self, name: str) -> None:
        await self.models.unload_model(name)

    async def import_gguf(self, path: str, name: str, progress: Any = None) -> ModelStatus:
        return await self.models.import_gguf(path, name, progress)

    async def import_folder(self, path: str, name: str) -> ModelStatus:
        return await self.models.import_folder(path, name)

    async def pull_model(self, name: str, progress: Any = None) -> ModelStatus:
        return await self.models.pull_model(name, progress)

    async def copy_model(self, src: str, dst: str) -> None:
        await self.models.copy_model(src, dst)

    async def delete_model(self, name: str) -> None:
        await self.models.delete_model(name)

    # --- inference --------------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if not self._accepting:
            raise EngineShuttingDownError()
        if self._thread.failed is not None:  # the engine thread died: nothing would answer
            raise EngineUnavailableError()

    def _submit(self, req: GenerateRequest, loaded: Any, sink: Sink) -> None:
        """Queue a request on its model's core (engine thread); `loaded` holds a reference,
        released here on failure and when the request ends."""
        try:
            core = self.models.core_for(loaded)
            ctx = core.scheduler.config.context_length
            n_prompt = len(req.prompt_token_ids)
            if n_prompt == 0:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            check_generate_request(req, loaded.vocab_size)
            if n_prompt + req.params.max_tokens > ctx:
                raise ContextLengthError(n_prompt, req.params.max_tokens, ctx)
            seq = Sequence(req)
            seq.metrics.prompt_tokens = n_prompt
            self.streams.open(req.request_id, sink)
            core.add(seq)
        except BaseException:
            self.streams.close(req.request_id)
            self.registry.release(loaded.name, req.keep_alive)
            raise
        self.streams.own(req.request_id, loaded.name, core)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:  # type: ignore[override]
        self._check_accepting()
        sink = Sink.here()
        t0 = time.monotonic()
        # Loading (when needed) runs on a worker thread: the engine thread keeps stepping.
        loaded = await asyncio.to_thread(self.models.acquire, request.model, request.keep_alive)
        load_time = time.monotonic() - t0
        try:
            plan = await self._plan(loaded, request)
        except BaseException:
            self.registry.release(loaded.name, request.keep_alive)
            raise
        await self._thread.call(lambda: self._submit(request, loaded, sink))
        rid = request.request_id
        hidden = set(loaded.eos_token_ids) | set(request.params.stop_token_ids)
        decode = decoder_for(plan, loaded.tokenizer.decode, hidden)
        pipe = OutputPipeline(
            Detokenizer(decode, request.prompt_token_ids, request.params.stop), plan
        )
        done = False
        try:
            while True:
                out = await sink.queue.get()
                try:
                    res = self._to_output(rid, pipe, out, load_time)
                except Exception:  # this request's text, stop strings or parsers: end it alone
                    log.exception("output processing failed for request %s", rid)
                    self._failed_streams += 1
                    res = self._final(
                        rid,
                        OutputDelta(),
                        StepOutput([], metrics=out.metrics, error=ROW_FAILED),
                        FinishReason.ERROR,
                        None,
                        load_time,
                    )
                if res is not None and res.finished and res.metrics is not None:
                    res.metrics.reasoning_tokens = pipe.reasoning_tokens  # what it thought
                if res is not None:
                    yield res
                if res is not None and res.finished:
                    done = out.finish_reason is not None
                    return
        finally:
            if not done:
                self._thread.post(lambda: self.streams.abort(rid))

    async def _plan(self, loaded: Any, request: GenerateRequest) -> Any:
        """The output plan (reasoning, tool calls, a grammar) of a request that asks for one."""
        spec = request.output
        if spec is None:
            return None
        if spec.calls_tools or spec.json_schema is not None:
            # Grammars compile here, off the engine thread, before the request is queued.
            return await asyncio.to_thread(prepare_output, loaded.tokenizer, request)
        return prepare_output(loaded.tokenizer, request)  # reasoning only: nothing to compile

    def _to_output(
        self, rid: str, pipe: OutputPipeline, out: StepOutput, load_time: float
    ) -> RequestOutput | None:
        """One step's output as the stream's next increment (None: nothing to say yet)."""
        delta = pipe.add(out.token_ids)
        if pipe.stopped is not None:
            delta.extend(pipe.finish_stopped())
            return self._final(rid, delta, out, FinishReason.STOP, pipe.stopped, load_time)
        if out.finish_reason is not None:
            delta.extend(pipe.flush())
            stop = (
                out.token_ids[-1]
                if out.finish_reason is FinishReason.STOP and out.token_ids
                else None
            )
            return self._final(rid, delta, out, out.finish_reason, stop, load_time)
        if delta or out.logprobs or out.prompt_logprobs:
            return self._increment(rid, delta, out)
        return None

    @staticmethod
    def _increment(rid: str, delta: OutputDelta, out: StepOutput, **final: Any) -> RequestOutput:
        return RequestOutput(
            rid,
            delta.content,
            delta.reasoning,
            delta.tool_calls,
            out.token_ids,
            out.logprobs,
            prompt_logprobs=out.prompt_logprobs,
            call_deltas=delta.call_deltas,
            **final,
        )

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
        return self._increment(
            rid,
            delta,
            out,
            finish_reason=reason,
            stop_matched=stop,
            metrics=metrics,
            error=out.error.message if out.error is not None else None,
            error_kind=out.error.kind if out.error is not None else "internal",
        )

    async def abort(self, request_id: str) -> None:
        self._thread.post(lambda: self.streams.abort(request_id))

    async def embed(self, model: str, inputs: list[list[int]]) -> list[list[float]]:
        self._check_accepting()

        def run() -> list[list[float]]:
            loaded = self.models.acquire(model, None)
            try:
                check_embedding_inputs(inputs, loaded.vocab_size)
                with self._embedding:
                    return [embed_tokens(loaded.model, ids) for ids in inputs]
            finally:
                self.registry.release(loaded.name, None)

        # A worker thread, not the engine thread: embeddings never stall the streams.
        return await asyncio.to_thread(run)

    def _take_snapshot(self) -> EngineStats:
        """Counts read on the engine thread between steps; stats() serves the latest copy."""
        cores = list(self.models.cores.values())
        runners = list(self.models.runners.values())
        dropped = self.models.dropped
        prefix = [r.prefix_cache for r in runners if r.prefix_cache is not None]
        rejections: dict[str, int] = {}
        for c in cores:
            for k, v in c.scheduler.rejections.items():
                rejections[k] = rejections.get(k, 0) + v
        return EngineStats(
            running=sum(len(c.scheduler.running) for c in cores),
            waiting=sum(len(c.scheduler.waiting) for c in cores),
            kv_budget_bytes=self.kv.budget_bytes,
            prefix_cache_hits=sum(p.hits for p in prefix),
            prefix_cache_queries=sum(p.queries for p in prefix),
            steps=dropped.get("steps", 0) + sum(c.steps for c in cores),
            failed_requests=dropped.get("failed", 0) + sum(c.failed_rows for c in cores),
            preemptions=dropped.get("preemptions", 0) + sum(c.scheduler.preemptions for c in cores),
            drafted_tokens=dropped.get("drafted", 0) + sum(c.scheduler.drafted for c in cores),
            accepted_tokens=dropped.get("accepted", 0) + sum(c.scheduler.accepted for c in cores),
            rejections=rejections,
        )

    def stats(self) -> EngineStats:
        snap = self._snapshot
        kv, prefix = self.models.memory_in_use()  # live: a long step's KV shows as it grows
        return dataclasses.replace(
            snap,
            kv_bytes=kv,
            kv_reserved_bytes=self.kv.used_bytes,
            prefix_cache_bytes=prefix,
            failed_requests=snap.failed_requests + self._failed_streams,
            loaded=self.running_models(),
            **dataclasses.asdict(self.memory.report()),
        )
