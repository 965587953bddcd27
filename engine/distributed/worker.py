"""A rank other than 0: loads its part of the served model when rank 0 says, then runs each step's
plan in lockstep until rank 0 says stop (exit 0) or the group fails (exit 1, never a hang).

Everything MLX of this rank, the group's start included, runs on the process's main thread.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import mlx.core as mx

from engine.distributed.group import Group, GroupError, Watchdog, init_group
from engine.distributed.leader import (
    KIB,
    LOAD_TIMEOUT,
    kv_tokens,
    load_split,
    memory_kib,
    warm_up,
)
from engine.distributed.plan import decode_step, step_deadline
from engine.model_manager import kv_caches
from engine.prefix_cache import PrefixCache
from engine.runner import ModelRunner
from engine.types import EngineConfig

log = logging.getLogger("mlxd.dist")


class Worker:
    def __init__(self, group: Group, config: EngineConfig):
        self.group = group
        self.config = config
        self.runner: ModelRunner | None = None
        self.loaded: Any = None
        self._load_msg: dict[str, Any] = {}
        self.watchdog = Watchdog(self._tripped)

    def _tripped(self, message: str) -> None:
        log.error("rank %d: %s; exiting", self.group.rank, message)
        logging.shutdown()
        os._exit(1)

    def run(self) -> int:
        # Rank 0 beats the idle group's heart every second; a longer silence is a failure.
        wait = LOAD_TIMEOUT
        while True:
            try:
                with self.watchdog.guard("a wait for rank 0", wait):
                    msg = self.group.broadcast(None)
                wait = self.config.dist_step_timeout
                timeout = self._deadline(msg)
                with self.watchdog.guard(f"a {msg['k']!r} message", timeout):
                    if not self._handle(msg):
                        return 0
            except Exception:  # the backend lost a peer, or this rank cannot follow rank 0
                log.exception("rank %d: the group failed", self.group.rank)
                return 1

    def _deadline(self, msg: dict[str, Any]) -> float:
        if msg["k"] in ("load", "warm"):
            return LOAD_TIMEOUT
        base = self.config.dist_step_timeout
        return step_deadline(msg, base) if msg["k"] == "step" else base

    def _handle(self, msg: dict[str, Any]) -> bool:
        kind = msg["k"]
        if kind == "stop":
            log.info("rank %d: rank 0 stopped; exiting", self.group.rank)
            return False
        if kind == "hb":
            self.group.gather(memory_kib())
        elif kind == "load":
            self._load(msg)
        elif kind == "step":
            self._step(msg)
        elif kind == "warm":
            if self.loaded is not None:
                self._warm(msg)
        else:
            raise GroupError(f"unknown message {kind!r} from rank 0")
        return True

    def _load(self, msg: dict[str, Any]) -> None:
        from models.registry import ModelRegistry

        name = str(msg["m"])
        try:
            registry = ModelRegistry(
                self.config.models_dir, memory_limit=self.config.memory_limit,
                weights_on_cpu=msg["w"], pinned=[name],
            )  # fmt: skip
            registry.apply_mlx_limits()
            registry.ensure_default(name)  # on another host the bundled model may be missing
            loaded = load_split(registry, name, self.group)
        except Exception:
            log.exception("rank %d: cannot load %s", self.group.rank, name)
            self.group.gather([1, 0, os.getpid(), 0])
            return
        self.loaded, self._load_msg = loaded, msg
        log.info("rank %d: %s ready, %s, %.0f MB of weights", self.group.rank, name,
                 loaded.weight_format, loaded.weight_bytes / 1e6)  # fmt: skip
        budget = int(registry.memory_limit * self.config.kv_fraction)
        tokens = kv_tokens(loaded, self.group, budget)
        self.group.gather([0, loaded.weight_bytes // KIB, os.getpid(), tokens])

    def _warm(self, msg: dict[str, Any]) -> None:
        """The runner rank 0 will make at its first request, made alike (same cache, same
        prefix budget counted in rank 0's bytes per token), and its first forward pass."""
        loaded, load = self.loaded, self._load_msg
        _, make_cache = kv_caches(loaded, int(load["c"]))
        prefix = PrefixCache(int(load["p"]), token_bytes=int(msg["t"]))
        self.runner = ModelRunner(loaded.model, make_cache, prefix, pipelined=False)
        warm_up(loaded)

    def _step(self, msg: dict[str, Any]) -> None:
        if self.runner is None:
            raise GroupError("a step before the model loaded")
        run_plan(self.runner, msg)


def run_plan(runner: ModelRunner, msg: dict[str, Any]) -> None:
    """Run one of rank 0's step plans on this rank's runner, to its end."""
    plan = decode_step(msg)
    rows = [sid for sid in runner.rows if sid in plan.feeds]
    if rows:  # rank 0's samples: the tokens its decode rows feed next
        tokens = mx.array([plan.feeds[sid] for sid in rows], dtype=mx.int32)
        for i, sid in enumerate(rows):
            runner.next_input[sid] = (tokens, i)
    runner.submit(plan.out).result()


def run_worker(config: EngineConfig) -> int:
    """Serve rank 0's plans on this rank; the process's exit code."""
    try:
        group = init_group(config.distributed)
    except GroupError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    log.info("rank %d of %d: %s parallel, waiting for rank 0", group.rank, group.size, group.mode)
    return Worker(group, config).run()
