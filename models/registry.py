"""The model registry: what is on disk, what is loaded, and when to unload.

Loads on first use (one load per model even when requests race), counts the requests using each
model, unloads idle ones after their keep_alive (Ollama semantics: seconds; 0 unload when idle;
negative never), and before a load unloads idle models least-recently-used until weights plus the
engine's live KV fit the memory limit. Models in use and pinned models are never unloaded for room.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from models import discovery, hub
from models.default import BUNDLED, DEFAULT_MODEL, bundled_gguf
from models.discovery import ModelEntry
from models.errors import (
    ImportFailedError,
    InsufficientMemoryError,
    ModelInUseError,
    ModelLoadError,
    ModelNotFoundError,
)
from models.gguf_process import import_gguf_isolated
from models.load_thread import run_load
from models.loader import LoadedModel, cpu_weight_format, load_model
from models.memory import backend, default_memory_limit
from models.names import model_dir, normalize_name

log = logging.getLogger("mlxd.registry")
GiB = 1 << 30


@dataclass
class LoadStatus:
    """A model's runtime state."""

    name: str
    loaded: bool
    refcount: int = 0
    expires_at: float | None = (
        None  # unix time of the idle unload; None: never, in use or not loaded
    )
    last_used: float = 0.0
    weight_bytes: int = 0
    weight_format: str = ""
    error: str | None = None  # the last load failure's message


@dataclass
class _Slot:
    model: LoadedModel
    refcount: int = 0
    keep_alive: float | None = None  # the last request's keep_alive; None: the registry default
    expires_at: float | None = None
    last_used: float = 0.0
    unload_when_idle: bool = False


class ModelRegistry:
    """Thread-safe; the engine thread and the server's worker threads may call it."""

    def __init__(
        self,
        models_dir: str | Path,
        *,
        memory_limit: int = 0,
        weights_on_cpu: str = "fp32",
        default_keep_alive: float = 300.0,
        pinned: Iterable[str] = (),
        aliases: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.models_dir = Path(models_dir).expanduser()
        self.memory_limit = int(memory_limit) or default_memory_limit()
        self.weights_on_cpu = weights_on_cpu
        self.default_keep_alive = float(default_keep_alive)
        self.aliases = {normalize_name(k): v for k, v in (aliases or {}).items()}
        self.pinned = {self._canonical(p) for p in pinned}
        self.clock = clock
        self.kv_bytes_fn: Callable[[], int] = lambda: 0  # set by the engine: live KV bytes
        # Set by the engine: some model is generating (a load then runs in the background).
        self.generating_fn: Callable[[], bool] = lambda: False
        # Set by a rank of a distributed group: applied to each model as built, before its
        # weights are read (load_model's `prepare`: a pipeline rank keeps its own layers).
        self.prepare_model: Callable[[Any], None] | None = None
        self._lock = threading.RLock()
        self._room_lock = threading.Lock()  # one load at a time keeps the memory accounting honest
        self._name_locks: dict[str, threading.Lock] = {}
        self._slots: dict[str, _Slot] = {}
        self._errors: dict[str, str] = {}
        self.load_count = 0  # loads performed (tests and metrics)

    # --- discovery ------------------------------------------------------------------------
    def _canonical(self, name: str) -> str:
        canon = normalize_name(name)
        target = self.aliases.get(canon)
        return normalize_name(target) if target else canon

    def list_models(self) -> list[ModelEntry]:
        """Every model folder in the models dir, from headers only."""
        return list(discovery.scan(self.models_dir).values())

    def resolve(self, name: str) -> ModelEntry:
        """The entry of a name or alias; InvalidModelNameError / ModelNotFoundError."""
        canon = self._canonical(name)
        path = model_dir(self.models_dir, canon)
        entry = discovery.describe(path, canon) if path.is_dir() else None
        if entry is None:
            raise ModelNotFoundError(name, sorted(e.name for e in self.list_models()))
        return entry

    def knows(self, name: str) -> bool:
        """On disk, or a bundled model that `pull` / `ensure_default` imports offline."""
        try:
            self.resolve(name)
            return True
        except ModelNotFoundError:
            return self._canonical(name) in BUNDLED

    # --- memory ---------------------------------------------------------------------------
    def used_bytes(self) -> int:
        with self._lock:
            weights = sum(s.model.weight_bytes for s in self._slots.values())
        return weights + int(self.kv_bytes_fn())

    def estimate_bytes(self, entry: ModelEntry) -> int:
        """Weight bytes a load will take: fp32 on CPU when dequantizing, ~1.1 bytes a parameter
        for q8 (8 bits and two float16 per 32), else the stored size."""
        fmt = cpu_weight_format(self.weights_on_cpu) if backend() == "cpu" else "as_stored"
        if fmt == "fp32":
            return entry.parameters * 4
        if fmt == "q8":
            return entry.parameters * 9 // 8
        return sum(f.stat().st_size for f in entry.path.glob("*.safetensors"))

    def apply_mlx_limits(self) -> None:
        """Tell MLX the same limit (advisory there); the engine bounds MLX's buffer cache."""
        mx.set_memory_limit(self.memory_limit)

    def _make_room(self, name: str, need: int) -> None:
        if need > self.memory_limit:
            raise InsufficientMemoryError(
                f"model '{name}' needs about {need / GiB:.1f} GiB, more than the "
                f"{self.memory_limit / GiB:.1f} GiB memory limit"
            )
        while self.used_bytes() + need > self.memory_limit:
            victim = self._lru_idle()
            if victim is None:
                raise InsufficientMemoryError(
                    f"not enough memory to load model '{name}' (needs about {need / GiB:.2f} GiB; "
                    f"{self.used_bytes() / GiB:.2f} of {self.memory_limit / GiB:.2f} GiB are in use "
                    "by models serving requests); retry later"
                )
            log.info("unloading idle model %s to make room for %s", victim, name)
            self._drop(victim)

    def _lru_idle(self) -> str | None:
        with self._lock:
            idle = [
                (s.last_used, n)
                for n, s in self._slots.items()
                if s.refcount == 0 and n not in self.pinned
            ]
        return min(idle)[1] if idle else None

    # --- load / unload --------------------------------------------------------------------
    def acquire(self, name: str, keep_alive: float | None = None) -> LoadedModel:
        """The loaded model (loading it if needed), with its refcount raised; pair with release()."""
        if (lm := self._take(self._canonical(name), keep_alive)) is not None:
            return lm  # loaded: no folder read on a request's path
        entry = self.resolve(name)
        key = entry.name
        with self._lock:
            lock = self._name_locks.setdefault(key, threading.Lock())
        with lock:
            if (lm := self._take(key, keep_alive)) is not None:
                return lm  # another thread loaded it while we waited
            with self._room_lock:
                self._make_room(key, self.estimate_bytes(entry))
                t0 = time.monotonic()
                try:
                    lm = run_load(
                        lambda: load_model(
                            entry.path, key, self.weights_on_cpu, self.prepare_model
                        ),
                        background=self.generating_fn(),
                    )
                except ModelLoadError as e:
                    self._errors[key] = str(e)
                    raise
            # Logged here, by the one thread that loaded: requests that waited on it say nothing.
            log.info(
                "loaded %s in %.1f s: %s, %.0f MB",
                key,
                time.monotonic() - t0,
                lm.weight_format,
                lm.weight_bytes / 1e6,
            )
            with self._lock:
                self.load_count += 1
                self._errors.pop(key, None)
                self._slots[key] = _Slot(lm, refcount=0, last_used=self.clock())
            taken = self._take(key, keep_alive)
            assert taken is not None
            return taken

    def _take(self, key: str, keep_alive: float | None) -> LoadedModel | None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            slot.refcount += 1
            slot.expires_at = None
            slot.last_used = self.clock()
            if keep_alive is not None:
                slot.keep_alive = float(keep_alive)
            return slot.model

    def release(self, name: str, keep_alive: float | None = None) -> None:
        """Drop one reference; when idle, schedule the unload after keep_alive seconds."""
        key = self._canonical(name)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.refcount <= 0:
                return
            slot.refcount -= 1
            slot.last_used = self.clock()
            if keep_alive is not None:
                slot.keep_alive = float(keep_alive)
            if slot.refcount > 0:
                return
            ka = slot.keep_alive if slot.keep_alive is not None else self.default_keep_alive
            if slot.unload_when_idle:  # an explicit unload waited for the requests to end
                self._drop(key)
            elif key in self.pinned or ka < 0:
                slot.expires_at = None
            elif ka == 0:
                self._drop(key)
            else:
                slot.expires_at = self.clock() + ka

    def evict_expired(self) -> list[str]:
        """Unload idle models whose keep_alive ran out; returns their names."""
        now = self.clock()
        with self._lock:
            due = [
                n
                for n, s in self._slots.items()
                if s.refcount == 0 and s.expires_at is not None and s.expires_at <= now
            ]
            for n in due:
                self._drop(n)
        return due

    def unload(self, name: str) -> bool:
        """Unload now if idle (True); else mark it to unload when its requests end (False)."""
        key = self._canonical(name)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return True
            if slot.refcount > 0:
                slot.unload_when_idle = True
                return False
            self._drop(key)
            return True

    def unload_all(self) -> None:
        with self._lock:
            for key in list(self._slots):
                self._drop(key)

    def _drop(self, key: str) -> None:
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is None:
            return
        del slot
        gc.collect()  # mlx-lm modules hold reference cycles; free the arrays now
        mx.clear_cache()

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [s.model for s in self._slots.values()]

    def status(self, name: str) -> LoadStatus:
        key = self._canonical(name)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return LoadStatus(key, loaded=False, error=self._errors.get(key))
            return LoadStatus(
                key,
                loaded=True,
                refcount=slot.refcount,
                expires_at=slot.expires_at,
                last_used=slot.last_used,
                weight_bytes=slot.model.weight_bytes,
                weight_format=slot.model.weight_format,
            )

    # --- managing the folder --------------------------------------------------------------
    def _new_dir(self, name: str) -> Path:
        dest = model_dir(self.models_dir, normalize_name(name))
        if dest.exists() or dest.is_symlink():
            raise ImportFailedError(f"model '{normalize_name(name)}' already exists")
        return dest

    def import_gguf(self, path: str | Path, name: str, progress=None) -> ModelEntry:
        """Import a GGUF file as `name` (ImportFailedError, InvalidModelNameError), in a child
        process: an import holds no GIL of the server's, so streams keep their pace."""
        dest = self._new_dir(name)
        import_gguf_isolated(path, dest, progress=progress)
        return self.resolve(name)

    def import_folder(self, path: str | Path, name: str) -> ModelEntry:
        """Copy an HF / MLX safetensors folder in as `name`."""
        src = Path(path)
        if discovery.describe(src, "imported:latest") is None:
            raise ImportFailedError("the folder is not a model (config.json + *.safetensors)")
        self._copy_tree(src, self._new_dir(name))
        return self.resolve(name)

    def copy(self, src: str, dst: str) -> ModelEntry:
        entry = self.resolve(src)
        self._copy_tree(entry.path, self._new_dir(dst))
        return self.resolve(dst)

    def _copy_tree(self, src: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=dest.parent))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=False)
            tmp.chmod(0o755)
            tmp.rename(dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImportFailedError("copying the model failed") from None

    def delete(self, name: str) -> None:
        """Remove a model from disk (unloading it if idle); ModelInUseError while serving."""
        entry = self.resolve(name)
        with self._lock:
            slot = self._slots.get(entry.name)
            if slot is not None and slot.refcount > 0:
                raise ModelInUseError(entry.name)
            self._drop(entry.name)
        shutil.rmtree(entry.path)

    def pull(
        self, repo_id: str, name: str | None = None, progress=None, endpoint: str | None = None
    ) -> ModelEntry:
        """Fetch a model: a bundled name (smollm2:135m, gemma3:270m) imports its packaged GGUF
        (works offline); otherwise `org/repo` is downloaded from the hub in MLX format."""
        if not hub.is_repo_id(repo_id):
            canon = normalize_name(repo_id)
            gguf_file = bundled_gguf(canon)
            if gguf_file is None:
                raise ImportFailedError(
                    f"'{repo_id}' is neither a bundled model nor a hub repository id (org/name)"
                )
            return self.import_gguf(gguf_file, name or canon, progress=progress)
        target = name or hub.default_name(repo_id)
        hub.download(repo_id, self._new_dir(target), progress=progress, endpoint=endpoint)
        return self.resolve(target)

    def ensure_default(self, name: str = DEFAULT_MODEL, progress=None) -> ModelEntry:
        """The entry of `name`, importing its bundled GGUF first if it isn't on disk yet
        (progress(done, total, what) is called only when it imports)."""
        try:
            return self.resolve(name)
        except ModelNotFoundError:
            pass
        path = bundled_gguf(self._canonical(name))
        if path is None:
            raise ImportFailedError(f"model '{name}' is not present and not bundled with mlxd")
        return self.import_gguf(path, name, progress=progress)
