"""The registry: discovery from headers, load on demand, refcounts, keep_alive, LRU under a limit."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import mlx.core as mx
import pytest

from models.errors import (
    InsufficientMemoryError,
    ModelInUseError,
    ModelLoadError,
    ModelNotFoundError,
)
from models.registry import ModelRegistry
from tests.tiny import make_tiny_model


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _models(root: Path, *names: str, **kw: object) -> None:
    for i, n in enumerate(names):
        make_tiny_model(root / n, seed=i, **kw)  # type: ignore[arg-type]


@pytest.fixture
def one_model_bytes(tmp_path: Path) -> int:
    """fp32 weight bytes of a default tiny model (what the registry measures after load)."""
    reg = ModelRegistry(tmp_path / "probe", memory_limit=1 << 30)
    make_tiny_model(tmp_path / "probe" / "p")
    return reg.acquire("p").weight_bytes


def test_list_models_reads_headers_only(tmp_path: Path) -> None:
    root = tmp_path / "models"
    make_tiny_model(root / "llama--fp32")
    make_tiny_model(root / "qwen--q4", arch="qwen3", bits=4)
    make_tiny_model(root / "llama--q4", bits=4)  # llama:fp32's twin, quantized
    (root / ".import-partial").mkdir()
    (root / "Bad Name").mkdir()
    (root / "stray.txt").write_text("x")
    reg = ModelRegistry(root, memory_limit=1 << 30)
    entries = {e.name: e for e in reg.list_models()}
    assert set(entries) == {"llama:fp32", "qwen:q4", "llama:q4"}
    fp, q = entries["llama:fp32"], entries["qwen:q4"]
    assert (fp.architecture, fp.quantization, fp.bits) == ("llama", "float32", None)
    assert (q.architecture, q.quantization, q.bits, q.group_size) == (
        "qwen3",
        "4-bit, group 32",
        4,
        32,
    )
    assert fp.context_length == 256 and fp.family == "llama"
    assert fp.size_bytes == sum(f.stat().st_size for f in (root / "llama--fp32").iterdir())
    assert fp.digest.startswith("sha256:") and fp.digest != q.digest
    assert reg.loaded() == []  # nothing was loaded to list them
    lm = reg.acquire("llama:fp32")
    n_params = sum(
        v.size for _, v in __import__("mlx.utils").utils.tree_flatten(lm.model.parameters())
    )
    assert fp.parameters == n_params
    # Counted from the packed 4-bit headers, the quantized twin has as many parameters.
    assert entries["llama:q4"].parameters == n_params
    assert 0 < q.parameters != n_params  # another architecture, another count


def test_resolve_unknown_and_aliases(tmp_path: Path) -> None:
    _models(tmp_path, "real--one")
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30, aliases={"nick": "real:one"})
    assert reg.resolve("nick").name == "real:one"
    with pytest.raises(ModelNotFoundError) as err:
        reg.resolve("missing:7b")
    assert err.value.known == ["real:one"]


def test_racing_acquires_load_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mlxd.registry")
    _models(tmp_path, "m")
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30)
    barrier = threading.Barrier(6)
    got: list[object] = []

    def worker() -> None:
        barrier.wait()
        got.append(reg.acquire("m"))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.load_count == 1
    assert len(got) == 6 and all(g is got[0] for g in got)
    assert reg.status("m").refcount == 6
    # One load, one log line: the five requests that waited on it do not report a load.
    assert sum(r.getMessage().startswith("loaded m") for r in caplog.records) == 1


def test_lru_eviction_under_limit(tmp_path: Path, one_model_bytes: int) -> None:
    root = tmp_path / "models"
    _models(root, "a", "b", "c")
    clock = Clock()
    reg = ModelRegistry(root, memory_limit=int(2.5 * one_model_bytes), clock=clock)
    for name in ("a", "b"):
        reg.acquire(name)
        clock.now += 1
        reg.release(name)
    clock.now += 1
    reg.acquire("a")  # a is now the most recently used
    clock.now += 1
    reg.release("a")
    reg.acquire("c")
    assert sorted(m.name for m in reg.loaded()) == ["a:latest", "c:latest"]
    assert reg.used_bytes() <= reg.memory_limit


def test_models_in_use_are_never_evicted(tmp_path: Path, one_model_bytes: int) -> None:
    root = tmp_path / "models"
    _models(root, "a", "b")
    reg = ModelRegistry(root, memory_limit=int(1.5 * one_model_bytes))
    reg.acquire("a")
    with pytest.raises(InsufficientMemoryError, match="model 'b:latest'"):
        reg.acquire("b")
    assert reg.status("a").loaded and reg.status("a").refcount == 1
    reg.release("a")
    reg.acquire("b")  # a is idle now: unloaded to make room
    assert [m.name for m in reg.loaded()] == ["b:latest"]


def test_pinned_models_are_not_evicted(tmp_path: Path, one_model_bytes: int) -> None:
    root = tmp_path / "models"
    _models(root, "a", "b")
    reg = ModelRegistry(root, memory_limit=int(1.5 * one_model_bytes), pinned=["a"])
    reg.acquire("a")
    reg.release("a", keep_alive=0)  # pinned: stays despite keep_alive 0
    assert reg.status("a").loaded
    with pytest.raises(InsufficientMemoryError):
        reg.acquire("b")


def test_live_kv_counts_against_the_limit(tmp_path: Path, one_model_bytes: int) -> None:
    root = tmp_path / "models"
    _models(root, "a", "b")
    reg = ModelRegistry(root, memory_limit=int(2.5 * one_model_bytes))
    reg.acquire("a")
    reg.release("a")
    reg.kv_bytes_fn = lambda: one_model_bytes
    reg.acquire("b")
    assert [m.name for m in reg.loaded()] == ["b:latest"]


def test_model_larger_than_limit_fails_fast(tmp_path: Path, one_model_bytes: int) -> None:
    _models(tmp_path, "a")
    reg = ModelRegistry(tmp_path, memory_limit=one_model_bytes // 2)
    with pytest.raises(InsufficientMemoryError, match="more than the"):
        reg.acquire("a")
    assert reg.load_count == 0


def test_keep_alive_expiry_with_fake_clock(tmp_path: Path) -> None:
    _models(tmp_path, "a", "b", "c")
    clock = Clock()
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30, default_keep_alive=300, clock=clock)
    reg.acquire("a")
    reg.release("a")
    assert reg.status("a").expires_at == clock.now + 300
    clock.now += 299
    assert reg.evict_expired() == []
    clock.now += 2
    assert reg.evict_expired() == ["a:latest"]
    assert not reg.status("a").loaded

    reg.acquire("b", keep_alive=-1)  # per-request: keep forever
    reg.release("b")
    assert reg.status("b").expires_at is None
    clock.now += 1e9
    assert reg.evict_expired() == []

    reg.acquire("c")
    reg.acquire("c")
    reg.release("c", keep_alive=0)
    assert reg.status("c").loaded  # still one request in flight
    reg.release("c")
    assert not reg.status("c").loaded  # keep_alive 0: unloaded as soon as idle


def test_unload_while_in_use_happens_when_idle(tmp_path: Path) -> None:
    _models(tmp_path, "a")
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30)
    reg.acquire("a", keep_alive=-1)
    assert reg.unload("a") is False
    assert reg.status("a").loaded
    reg.release("a")
    assert not reg.status("a").loaded


def test_unload_frees_memory(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "big", hidden=256, layers=4)
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30)
    mx.clear_cache()
    before = mx.get_active_memory()
    lm = reg.acquire("big")
    weight_bytes = lm.weight_bytes
    assert mx.get_active_memory() - before >= 0.9 * weight_bytes
    del lm
    reg.release("big")
    assert reg.unload("big")
    assert mx.get_active_memory() - before < 0.1 * weight_bytes


def test_failed_load_is_reported_and_others_keep_serving(tmp_path: Path) -> None:
    _models(tmp_path, "good", "bad")
    (tmp_path / "bad" / "tokenizer.json").unlink()
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30)
    reg.acquire("good")
    with pytest.raises(ModelLoadError, match="'bad:latest'"):
        reg.acquire("bad")
    assert "no tokenizer" in (reg.status("bad").error or "")
    assert reg.status("good").loaded and reg.status("good").refcount == 1


def test_copy_and_delete(tmp_path: Path) -> None:
    _models(tmp_path, "a")
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30)
    copied = reg.copy("a", "b:v2")
    assert copied.name == "b:v2" and copied.digest == reg.resolve("a").digest
    reg.acquire("b:v2")
    with pytest.raises(ModelInUseError):
        reg.delete("b:v2")
    reg.release("b:v2")
    reg.delete("b:v2")
    assert not (tmp_path / "b--v2").exists() and not reg.status("b:v2").loaded
    assert [e.name for e in reg.list_models()] == ["a:latest"]


def test_loads_run_in_the_background_only_while_a_model_generates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.load_thread as load_thread

    threads: list[str] = []
    real = load_thread.run_load

    def recording(fn, background):  # type: ignore[no-untyped-def]
        threads.append(real(lambda: threading.current_thread().name, background))
        return real(fn, background)

    monkeypatch.setattr("models.registry.run_load", recording)
    _models(tmp_path, "a", "b")
    reg = ModelRegistry(tmp_path, memory_limit=1 << 30)
    reg.acquire("a")  # nothing generates: an ordinary thread
    reg.generating_fn = lambda: True
    reg.acquire("b")
    assert threads == ["mlxd-load", "mlxd-load-bg"]
