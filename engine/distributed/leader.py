"""Rank 0's side of the group: it loads the served model on every rank, sends each step's plan
before running its own part of it, beats the idle group's heart, and turns any failure of the
group into the end of the process (never a silent hang).

Every collective of rank 0 runs on the engine thread, under a watchdog: a collective that raises
(the backend lost a peer) or outlasts the step timeout marks the group failed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from engine.distributed.group import Group, GroupError, Watchdog, exit_soon, init_group
from engine.distributed.plan import encode_step, step_deadline
from engine.outputs import RunnerOutput, ScheduledSeq, SchedulerOutput
from engine.pending import PendingStep
from engine.runner import ModelRunner
from engine.types import EngineConfig, GroupStatus, RankStatus
from models.errors import ModelError
from models.pipeline import PipelineSplit
from models.sharding import (
    ShardingError,
    check_split,
    describe_split,
    layers_of,
    resident_weight_bytes,
    shard_tensor,
)

log = logging.getLogger("mlxd.dist")
LOAD_TIMEOUT = 900.0  # every rank reads and splits the model: minutes for a large one
KIB = 1024
# Three small all_sums: a peer that does not answer them within this is gone (a dead rank is not
# always seen by the backend itself: a ring neighbour may wait on the one that waits on it).
HEARTBEAT_TIMEOUT = 10.0


class Leader:
    """The group as rank 0 uses it. `on_fail(message)` ends every stream; the process then exits."""

    def __init__(self, config: EngineConfig, on_fail: Callable[[str], None]):
        self.config = config
        self.timeout = config.dist_step_timeout
        self._on_fail = on_fail
        self.group: Group | None = None
        self.failed = ""
        self.watchdog = Watchdog(self.fail)
        self.status = GroupStatus(config.distributed, config.default_model, "")
        self.token_bytes = 0  # the served model's KV bytes per token, once loaded
        self.kv_budget_bytes = 0  # the group's, once loaded

    # --- failure ----------------------------------------------------------------------------
    def fail(self, message: str) -> None:
        """The group is gone: say so once, end every stream, exit non-zero (any thread)."""
        if self.failed:
            return
        self.failed = self.status.failed = message
        log.error("distributed group failed: %s; rank 0 exits", message)
        try:
            self._on_fail(message)
        finally:
            exit_soon(1)

    def call(self, what: str, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        if self.failed:
            raise GroupError(self.failed)
        with self.watchdog.guard(what, timeout or self.timeout):
            try:
                return fn()
            except RuntimeError as e:  # the backend lost a peer: "[ring] connection ... lost"
                self.fail(f"{what} failed: {e}")
                raise GroupError(str(e)) from e

    def send(self, message: dict[str, Any], what: str) -> None:
        assert self.group is not None
        group = self.group
        self.call(what, lambda: group.broadcast(message))

    # --- start, heartbeat, stop (engine thread) --------------------------------------------
    def start(self, registry: Any) -> Any:
        """Join the group, load and split the served model on every rank; the loaded model,
        held for good. Raises GroupError when a rank cannot serve it."""
        name = self.config.default_model
        self.group = group = self.call("the group's start", lambda: init_group(self.status.mode),
                                       LOAD_TIMEOUT)  # fmt: skip
        try:
            check_split(group.mode, registry.resolve(name).config, group.size)
        except (ModelError, ShardingError) as e:
            self.stop()
            raise GroupError(f"cannot serve {name} {group.mode}-parallel: {e}") from None
        self.send({"k": "load", "m": name, "w": self.config.weights_on_cpu,
                   "c": self.config.max_context, "p": self.config.prefix_cache_bytes},
                  "the load message")  # fmt: skip
        error = ""
        loaded = None
        try:
            loaded = load_split(registry, name, group)
        except Exception as e:  # reported after every rank answered: the group stops cleanly
            error = f"rank 0: {e}"
            log.exception("cannot load %s for the group", name)
        me = [1, 0, os.getpid(), 0]
        if loaded is not None:
            budget = int(registry.memory_limit * self.config.kv_fraction)
            me = [0, loaded.weight_bytes // KIB, os.getpid(), kv_tokens(loaded, group, budget)]
        rows = self.call("the model's load", lambda: group.gather(me), LOAD_TIMEOUT)
        bad = [r for r, row in enumerate(rows) if row[0]]
        if bad or loaded is None:
            self.stop()
            raise GroupError(error or f"rank(s) {bad} could not load {name} (see their logs)")
        # Every rank's first forward pass pays one-time costs (allocations, kernel setup) that
        # can take many steady steps' time: paid here, under the load's deadline. The message
        # carries rank 0's prefix-cache cost of a token, which every rank's cache then uses.
        self.token_bytes = loaded.kv_bytes_per_token()
        self.send({"k": "warm", "t": self.token_bytes}, "the warm-up message")
        self.call("the warm-up", lambda: warm_up(loaded), LOAD_TIMEOUT)
        self.status.model = loaded.name
        self.status.split = describe_split(group.mode, group.size, loaded.config)
        self.status.ranks = [
            RankStatus(r, pid=pid, weight_bytes=w * KIB, kv_tokens=kv)
            for r, (_, w, pid, kv) in enumerate(rows)
        ]
        # Rank 0 schedules for the group: its KV budget (counted in the whole model's bytes
        # per token) is what the tightest rank's own memory holds.
        tokens = min(kv for *_, kv in rows)
        self.kv_budget_bytes = tokens * self.token_bytes
        log.info("serving %s: %s; KV for %d tokens (ranks' own budgets: %s)", loaded.name,
                 self.status.split, tokens, ", ".join(str(row[3]) for row in rows))  # fmt: skip
        return loaded

    def heartbeat(self) -> None:
        """Between steps: every rank answers with its memory (for /metrics and /api/ps)."""
        if self.failed or self.group is None:
            return
        group = self.group
        quick = min(self.timeout, HEARTBEAT_TIMEOUT)
        self.call("a heartbeat", lambda: group.broadcast({"k": "hb"}), quick)
        rows = self.call("a heartbeat", lambda: group.gather(memory_kib()), quick)
        for st, (active, peak) in zip(self.status.ranks, rows):
            st.active_bytes, st.peak_bytes = active * KIB, peak * KIB

    def stop(self) -> None:
        """Rank 0 is shutting down: the other ranks exit 0."""
        if not self.failed and self.group is not None:
            self.send({"k": "stop"}, "the stop message")
            self.group = None  # the others are gone: no heartbeat may follow

    def make_runner(self, model: Any, make_cache: Callable[[], list], prefix: Any) -> ModelRunner:
        # Entries counted in tokens, alike on every rank whatever its share of the KV: the
        # ranks keep and evict the same prefixes (a restore missing on one rank would be a
        # forward pass the others do not run).
        prefix.token_bytes = self.token_bytes
        return LeaderRunner(self, model, make_cache, prefix)


def load_split(registry: Any, name: str, group: Group) -> Any:
    """The model loaded through `registry` (held, never released) and split for this rank. A
    pipeline rank cuts the model as built, before any weight is read: it never reads the
    other ranks' layers."""
    if group.mode == "pipeline":
        split = PipelineSplit(group.group)
        registry.prepare_model = split.cut
        try:
            loaded = registry.acquire(name, -1)
        finally:
            registry.prepare_model = None
        stage = split.finish(loaded.model)
        loaded.weight_bytes = stage.weight_bytes
        held = f"layers {stage.layers.start}-{stage.layers.stop - 1} of {stage.num_layers}"
    else:
        loaded = registry.acquire(name, -1)
        shard_tensor(loaded.model, group.group)
        loaded.weight_bytes = resident_weight_bytes(loaded.model)
        held = f"1/{group.size}"
    loaded.weight_format += f", {group.mode} parallel: {held}"
    return loaded


def kv_tokens(loaded: Any, group: Group, budget_bytes: int) -> int:
    """Tokens of KV `budget_bytes` hold on this rank: it keeps its layers' part of each token's
    KV (a pipeline rank), or 1/N of every layer's KV heads (a tensor rank)."""
    total = int(loaded.config.get("text_config", loaded.config).get("num_hidden_layers") or 0)
    share = len(layers_of(loaded.model)) / max(total, 1)
    if group.mode == "tensor":
        share /= group.size
    per_token = max(1.0, loaded.kv_bytes_per_token() * share)
    return min(int(budget_bytes / per_token), 2**31 - 1)


def warm_up(loaded: Any) -> None:
    """One small forward pass, alike on every rank (its collectives pair up)."""
    cache = loaded.make_cache()
    mx.eval(loaded.model(mx.array([[1, 2, 3, 4]], dtype=mx.int32), cache=cache))


def memory_kib() -> list[int]:
    return [mx.get_active_memory() // KIB, mx.get_peak_memory() // KIB]


class LeaderRunner(ModelRunner):
    """A ModelRunner whose every step is sent to the group first. Never pipelined: a plan carries
    the tokens sampled by the step before it."""

    def __init__(
        self, leader: Leader, model: Any, make_cache: Callable[[], list], prefix: Any
    ) -> None:
        super().__init__(model, make_cache, prefix, pipelined=False)
        self.leader = leader

    def _prefill_batches(self, fresh: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
        # Every rank must batch a step's new prompts alike (each batch is a forward pass the
        # others run in lockstep) and the other ranks' runners batch them all together: the
        # memory-budgeted split would need its partition in the plan.
        return [fresh]

    def _prefill_pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(start, end)]  # one forward pass, as the other ranks run it

    def submit(self, out: SchedulerOutput) -> PendingStep:
        # Rows whose sampling state cannot be made fail before any forward pass on rank 0
        # alone: the plan leaves them out (the runner fails them again, the same way).
        early = PendingStep()
        for s in out.scheduled:
            self._has_state(s.seq, early)
        planned = SchedulerOutput(
            [s for s in out.scheduled if s.seq.id not in early.failed], out.finished, out.preempted
        )
        plan = encode_step(planned, set(self.rows), self._feeds())
        self.leader.send(plan, "a step's plan")
        deadline = step_deadline(plan, self.leader.timeout)
        step: PendingStep = self.leader.call(
            "a step", lambda: ModelRunner.submit(self, out), deadline
        )
        return _Guarded(
            step.samples, step.prompt_scores, step.failed, leader=self.leader, deadline=deadline
        )

    def _feeds(self) -> dict[str, int]:
        """The token each decode row feeds next (read: the step before was read already)."""
        lists: dict[int, list[int]] = {}
        feeds = {}
        for sid in self.rows:
            tokens, row = self.next_input[sid]
            got = lists.get(id(tokens))
            if got is None:
                got = lists[id(tokens)] = [int(t) for t in np.asarray(tokens)]
            feeds[sid] = got[row]
        return feeds

    def reset(self) -> None:
        # A shared pass failed on rank 0: the other ranks may sit inside its collectives, so
        # no later message could be matched with theirs. The group ends.
        super().reset()
        self.leader.fail("a step failed on rank 0 (see its log)")


@dataclass
class _Guarded(PendingStep):
    """A step whose reading is a guarded collective too (its tokens wait on every rank)."""

    leader: Any = None
    deadline: float = 0.0

    def result(self) -> RunnerOutput:
        read = lambda: PendingStep.result(self)  # noqa: E731
        out: RunnerOutput = self.leader.call("a step", read, self.deadline)
        return out
