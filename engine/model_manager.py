"""Models as the engine serves them: the registry (on disk, loaded), one EngineCore per loaded
model, and each loaded model's metadata, read once per load.

Loads run on the registry's load thread in the background (models/load_thread.py), never on the
engine thread, so a load does not stall the streams of models already loaded; the cores (cheap)
are made and dropped on the engine thread, between steps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from engine.api import ModelHandle
from engine.core import Emit, EngineCore
from engine.engine_thread import EngineThread
from engine.errors import NotServedError
from engine.kv_manager import KVManager
from engine.memory import MemoryGovernor
from engine.prefix_cache import PrefixCache
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig
from engine.types import EngineConfig, ModelStatus

log = logging.getLogger("mlxd.engine")


class ModelManager:
    def __init__(
        self,
        config: EngineConfig,
        registry: Any,
        kv: KVManager,
        memory: MemoryGovernor,
        thread: EngineThread,
        emit: Emit,
    ):
        self.config = config
        self.registry = registry
        self.kv = kv
        self.memory = memory
        self._thread = thread
        self._emit = emit
        self.cores: dict[str, EngineCore] = {}
        self.runners: dict[str, ModelRunner] = {}  # the MLX side under each core
        self._entries: dict[str, Any] = {}  # a loaded model's registry entry, read at its load
        # What a step of each model allocates and frees: (a full prompt chunk's, a decode's).
        self._step_bytes: dict[str, tuple[int, int]] = {}
        self._weights: dict[str, int] = {}  # each core's model's weight bytes
        self.dropped: dict[str, int] = {}  # counters of cores since dropped (never go down)
        # A distributed group serves one model, whose runner sends each step to the other ranks.
        self.make_runner: Callable[..., ModelRunner] = ModelRunner
        self.served: str | None = None

    # --- what there is --------------------------------------------------------------------------
    def list_models(self) -> list[ModelStatus]:
        return [self._status(e) for e in self.registry.list_models()]

    def knows_model(self, name: str) -> bool:
        """On disk, or a bundled model the registry can import offline (the default one)."""
        return bool(self.registry.knows(name))

    def model_status(self, name: str) -> ModelStatus:
        entry = self._entries.get(name)
        if entry is None or not self.registry.status(entry.name).loaded:
            self._entries.pop(name, None)
            entry = self.registry.resolve(name)  # reads the folder's headers
        return self._status(entry)

    def running_models(self) -> list[ModelStatus]:
        return [self.model_status(m.name) for m in self.registry.loaded()]

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

    # --- loading ----------------------------------------------------------------------------------
    def acquire(self, name: str, keep_alive: float | None) -> Any:
        """The loaded model with a reference taken (pair with registry.release). Loads it if
        needed, so call it off the engine thread."""
        if self.served is not None and self.registry.resolve(name).name != self.served:
            raise NotServedError(name, self.served)
        loaded = self.registry.acquire(name, keep_alive)  # logs the load, once per load
        if loaded.name not in self._entries:
            try:
                self._entries[loaded.name] = self.registry.resolve(loaded.name)
            except BaseException:
                self.registry.release(loaded.name, keep_alive)
                raise
        return loaded

    async def get_model(self, name: str, keep_alive: float | None = None) -> ModelHandle:
        t0, loads = time.monotonic(), self.registry.load_count
        loaded = await asyncio.to_thread(self.acquire, name, keep_alive)
        did_load = self.registry.load_count != loads
        load_time = time.monotonic() - t0 if did_load else 0.0
        try:
            await self._thread.call(lambda: self.core_for(loaded))
        finally:
            self.registry.release(loaded.name, keep_alive)
        if did_load:  # what the load freed (its tokenizer's parse, MLX's cache as its limit fell),
            # given back off the engine thread: the first trim after a load takes ~8 ms
            await asyncio.to_thread(self.memory.trim_heap)
        status = self.model_status(loaded.name)
        return ModelHandle(loaded.name, status, loaded.tokenizer, load_time)

    def core_for(self, loaded: Any) -> EngineCore:
        """The model's core, made at its first request after a load (engine thread)."""
        core = self.cores.get(loaded.name)
        if core is not None and self.runners[loaded.name].model is loaded.model:
            return core
        window, make_cache = kv_caches(loaded, self.config.max_context)
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_waiting=self.config.max_waiting,
            kv_chunk=self.config.kv_chunk,
            kv_bytes_per_token=loaded.kv_bytes_per_token(),
            context_length=loaded.context_length,
            kv_window=window,
            speculative=self.config.speculative,
            speculative_tokens=self.config.speculative_tokens,
        )
        prefix = PrefixCache(self.config.prefix_cache_bytes)
        runner = self.make_runner(loaded.model, make_cache, prefix)
        scheduler_config.verify_positions = runner.exact_positions
        if not runner.trimmable:  # sliding-window caches can't drop one row's drafts
            scheduler_config.speculative = "off"
        elif self.config.speculative == "auto" and not runner.cheap_positions:
            scheduler_config.speculative = "off"
        scheduler = Scheduler(
            scheduler_config,
            self.kv,
            prefix.lookup,
            set(loaded.eos_token_ids),
            loaded.tokenizer.id_to_token_text,
        )
        core = EngineCore(scheduler, runner, self._emit, overlap=runner.pipelined)
        self.cores[loaded.name] = core
        self.runners[loaded.name] = runner
        step_bytes = loaded.step_activation_bytes(
            self.config.max_num_batched_tokens, self.config.max_num_seqs
        )
        # New prompts batched together stay within what a step is budgeted (and MLX caches),
        # and within a share of what the models hold as they start.
        runner.prefill_bytes = loaded.prefill_activation_bytes
        runner.prefill_budget = lambda: min(
            step_bytes, self.memory.transient_budget(self.held_bytes())
        )
        self._weights[loaded.name] = loaded.weight_bytes
        decode_bytes = loaded.step_activation_bytes(
            self.config.max_num_seqs, self.config.max_num_seqs
        )
        self._step_bytes[loaded.name] = step_bytes, decode_bytes
        self._limit_cache()
        return core

    def memory_in_use(self) -> tuple[int, int]:
        """(KV bytes, prefix-cache bytes) as of now: ints the runners keep current mid-step,
        read from any thread."""
        runners = list(self.runners.values())
        kv = sum(r.kv_in_use for r in runners)
        return kv, sum(r.prefix_cache.nbytes for r in runners if r.prefix_cache is not None)

    def held_bytes(self) -> int:
        """What the models hold as of now: weights, KV and prefix caches (any thread)."""
        return sum(self._weights.values()) + sum(self.memory_in_use())

    def drop_core(self, name: str) -> None:
        core = self.cores.pop(name, None)
        runner = self.runners.pop(name, None)
        if core is not None:
            for key, value in counters(core).items():
                self.dropped[key] = self.dropped.get(key, 0) + value
        if runner is not None and runner.prefix_cache is not None:
            runner.prefix_cache.clear()
        self._step_bytes.pop(name, None)
        self._weights.pop(name, None)
        self._limit_cache()

    def _limit_cache(self) -> None:
        steps = self._step_bytes.values()
        self.memory.set_step_bytes(sum(s for s, _ in steps), sum(d for _, d in steps))

    def generating(self) -> bool:
        """Some model has requests running or waiting (any thread: a snapshot of the cores)."""
        return any(core.has_work for core in list(self.cores.values()))

    def prefilling(self) -> bool:
        """Some model has prompts left to prefill (waiting, or running in chunks)."""
        return any(
            c.scheduler.waiting or any(s.prefilling for s in c.scheduler.running)
            for c in self.cores.values()
        )

    def housekeeping(self) -> None:
        """Unload models whose keep_alive ran out; drop idle cores of unloaded models."""
        self.registry.evict_expired()
        loaded = {m.name: m.model for m in self.registry.loaded()}
        for name, core in list(self.cores.items()):
            if loaded.get(name) is not self.runners[name].model and not core.has_work:
                self.drop_core(name)

    def unload_all(self) -> None:
        for name in list(self.cores):
            self.drop_core(name)
        self.registry.unload_all()

    def ensure_default(self) -> None:
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

    # --- the models folder ---------------------------------------------------------------------
    async def unload_model(self, name: str) -> None:
        canonical = self.registry.resolve(name).name

        def unload() -> None:
            if self.registry.unload(canonical):
                self.drop_core(canonical)

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
        self._entries.pop(canonical, None)
        await asyncio.to_thread(self.registry.delete, canonical)


def freeze_heap() -> None:
    """Take every object alive now out of Python's later garbage collections (gc.freeze), once
    the server has started: what the imports made lives as long as the process.

    A full collection walks every tracked object holding the GIL: 75-190 ms with transformers
    and its kin imported, every stream stalled meanwhile, and a load's new objects set one off
    soon after. Frozen, the imports cost none; a loaded model adds ~3k objects (0.7 ms a
    collection for SmolLM2), left unfrozen so that an unloaded model's cycles (its tokenizer's)
    are still collected."""
    gc.freeze()


def kv_caches(loaded: Any, max_context: int) -> tuple[int, Callable[[], list]]:
    """The KV window (0: the whole context) and the factory of a sequence's caches; every rank
    of a group makes them alike. max_context caps the KV kept, not the conversation: past it a
    rotating cache keeps the most recent tokens and generation goes on."""
    window = max_context if 0 < max_context < loaded.context_length else 0
    return window, (lambda: loaded.make_cache(window)) if window else loaded.make_cache


def counters(core: EngineCore) -> dict[str, int]:
    """A core's cumulative counters, for /metrics."""
    s = core.scheduler
    return {
        "steps": core.steps,
        "failed": s.failed,
        "preemptions": s.preemptions,
        "drafted": s.drafted,
        "accepted": s.accepted,
    }
