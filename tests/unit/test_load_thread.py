"""Model loads run on one kept thread in the background (models/load_thread.py), and a background
MLX stream computes the kernels' results alone, in the idle class (kernels/pool.cpp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import models  # noqa: F401  (BLAS before mlx)
from models import qkernels
from models.load_thread import run_load

IDLE = getattr(os, "SCHED_IDLE", None)


def _idle_allowed() -> bool:
    """Whether this process may put a thread in the idle class (a sandbox may forbid it)."""
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, IDLE, os.sched_param(0))  # type: ignore[arg-type]
            allowed.append(True)
        except OSError:
            allowed.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return allowed[0]


def _policies() -> dict[int, int]:
    """Each thread of this process and its scheduling policy."""
    return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}


def _fail() -> None:
    raise ValueError("a bad weights file")


@pytest.mark.parametrize("background", [True, False])
def test_loads_run_on_one_kept_thread_and_their_errors_reach_the_caller(background: bool) -> None:
    idents = {run_load(threading.get_ident, background) for _ in range(3)}
    assert len(idents) == 1 and threading.get_ident() not in idents
    name = run_load(lambda: threading.current_thread().name, background)
    assert name == ("mlxd-load-bg" if background else "mlxd-load")
    with pytest.raises(ValueError, match="bad weights"):
        run_load(_fail, background)
    assert run_load(lambda: 42, background) == 42  # the thread serves on after a failure


@pytest.mark.skipif(IDLE is None or not _idle_allowed(), reason="no idle scheduling class here")
def test_a_background_load_runs_in_the_idle_class_and_only_it() -> None:
    assert run_load(lambda: os.sched_getscheduler(0), background=True) == IDLE
    assert run_load(lambda: os.sched_getscheduler(0), background=False) != IDLE
    assert os.sched_getscheduler(0) != IDLE  # the caller keeps its own


# A fresh process whose first kernel call runs on a background stream: the kernels' workers start
# then, so they would inherit the idle class if they were started from that stream's thread.
FIRST_CALL_IN_THE_BACKGROUND = """
import json, os, threading
import models
import mlx.core as mx
from models import qkernels

def policies():
    return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}

mx.random.seed(3)
w, s, b = mx.quantize(mx.random.normal((1536, 576)) * 0.1, group_size=32, bits=4)
x = mx.random.normal((16, 576))
mx.eval(w, s, b, x)
out = {}

def on_a_background_stream():
    assert qkernels.background_stream(mx.default_stream(mx.cpu))
    y = qkernels.qmm(x, w, s, b, 4)  # 1536 rows: split over the workers on any other stream
    mx.eval(y)
    out["y"] = y

t = threading.Thread(target=on_a_background_stream)
t.start()
t.join()
ref = qkernels.qmm(x, w, s, b, 4)
mx.eval(ref)
idle = [tid for tid, p in policies().items() if p == os.SCHED_IDLE]
print(json.dumps({"same": mx.array_equal(out["y"], ref).item(), "idle": len(idle)}))
"""


@pytest.mark.skipif(not qkernels.available(), reason="mlxd kernels not built")
@pytest.mark.skipif(IDLE is None or not _idle_allowed(), reason="no idle scheduling class here")
def test_a_background_stream_computes_the_same_bits_alone_in_the_idle_class() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_IN_THE_BACKGROUND],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The stream's thread alone is idle: the kernels' workers, started by the same call, are not.
    assert result == {"same": True, "idle": 1}


def test_a_background_thread_that_cannot_go_idle_still_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import models.load_thread as load_thread

    def refused() -> None:
        raise RuntimeError("no kernels here")

    monkeypatch.setattr(load_thread, "_to_background", refused)
    monkeypatch.setattr(load_thread, "_threads", {})  # a new background thread, made below
    got: list[int] = []
    asking = threading.Thread(target=lambda: got.append(run_load(lambda: 7, background=True)))
    asking.start()
    asking.join(30)  # a thread that died at its start would leave the load waiting for ever
    assert got == [7]
