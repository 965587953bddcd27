"""Rank 0's engine: the AsyncEngine serving one model across the group.

Differences from one process: the served model is loaded at start on every rank (on the engine
thread, which then owns the group) and stays loaded; other models are not served; embeddings are
refused (their forward pass would have to run on every rank too); each step goes through the
Leader; a failed group ends every stream with an error, answers 503, and exits non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from engine.async_engine import AsyncEngine
from engine.distributed.group import GroupError, launched_rank
from engine.distributed.leader import Leader
from engine.errors import GroupFailedError, InvalidRequestError
from engine.outputs import Failure, StepOutput
from engine.types import EngineConfig, EngineStats, FinishReason, GroupStatus

log = logging.getLogger("mlxd.dist")


class DistributedEngine(AsyncEngine):
    def __init__(self, config: EngineConfig):
        # On the CPU backend a tensor split takes fp32 weights: a shard of a quantized layer is
        # MLX's own QuantizedLinear, whose CPU matmul is far slower than mlxd's kernels or the
        # BLAS (a 3-rank step measured minutes, not seconds). Other backends keep their
        # format, and so does a pipeline split (whole layers: mlxd's kernels run them as is).
        # Speculative drafts are not part of a step's plan yet: the group decodes without them.
        tensor = config.distributed == "tensor"
        config = dataclasses.replace(
            config,
            pinned=[*config.pinned, config.default_model],
            weights_on_cpu="fp32" if tensor else config.weights_on_cpu,
            speculative="off",
        )
        super().__init__(config)
        self.leader = Leader(config, self._group_failed)
        self.models.make_runner = self.leader.make_runner

    async def start(self) -> None:
        if launched_rank() != 0:
            raise GroupError("DistributedEngine runs on rank 0 only")
        # AsyncEngine.start without its preloads (one model here) and its matmul measurement.
        self._limit_memory()  # as AsyncEngine.start does: limits and the buffer-cache governor
        self._thread.start()
        await asyncio.to_thread(self.models.ensure_default)
        try:
            loaded = await self._thread.call(lambda: self.leader.start(self.registry))
        except GroupError as e:
            # One line, and out: the other ranks were told to stop; a traceback (and MLX's
            # teardown of a group whose peers are gone) would only bury the reason.
            log.error("cannot start the group: %s", e)
            logging.shutdown()
            os._exit(2)
        self.models.served = loaded.name
        self.kv.budget_bytes = self.leader.kv_budget_bytes  # before the first request
        await self.get_model(loaded.name)  # its core, now: the first request finds it ready

    def _check_accepting(self) -> None:
        if self.leader.failed:
            raise GroupFailedError(self.leader.failed)
        super()._check_accepting()

    def _housekeeping(self) -> None:
        super()._housekeeping()
        try:
            self.leader.heartbeat()
        except GroupError:
            pass  # the leader has failed the group: streams ended, the process exits

    async def _drain_and_stop(self, drain_timeout: float) -> None:
        await self._drain(drain_timeout)
        if self._thread.alive and not self.leader.failed:
            await self._thread.call(self.leader.stop)
        await asyncio.to_thread(self._thread.stop)

    async def unload_model(self, name: str) -> None:
        raise InvalidRequestError("a distributed group keeps its model loaded", param="model")

    async def embed(self, model: str, inputs: list[list[int]]) -> list[list[float]]:
        raise InvalidRequestError(
            "embeddings are not served by a distributed group (run a single-process mlxd)"
        )

    def _group_failed(self, message: str) -> None:
        """Any thread (the engine thread may be stuck in a collective): end every stream with an
        error frame now; new requests get 503 from here on."""
        self._accepting = False
        error = Failure("unavailable", str(GroupFailedError(message)))
        self.streams.end_all(StepOutput([], finish_reason=FinishReason.ERROR, error=error))

    def group_status(self) -> GroupStatus:
        st = self.leader.status
        return dataclasses.replace(st, ranks=[dataclasses.replace(r) for r in st.ranks])

    def stats(self) -> EngineStats:
        s = super().stats()
        s.group = self.group_status()
        return s
