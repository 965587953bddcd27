"""Load an optimized BLAS before MLX so its CPU backend's `cblas_sgemm` calls resolve to it.

The `mlx[cpu]` wheel links a reference BLAS (a few GFLOP/s). MLX's CPU matmul calls the standard
`cblas_*` symbols, so a library exporting them, loaded first with RTLD_GLOBAL, takes over. We prefer
MKL from the `mkl` wheel (no root needed), then a system OpenBLAS; elsewhere (macOS Accelerate,
CUDA, Linux arm64 without OpenBLAS) nothing is loaded. This module must not import mlx.

Only processes that run MLX call preload(), first thing: the `mlxd` command (server/cli.py) and
the test session (tests/conftest.py). Importing engine or models loads nothing.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import platform
import sys
from dataclasses import dataclass

log = logging.getLogger("mlxd.blas")


@dataclass
class BlasInfo:
    name: str  # "mkl", "openblas", "bundled", "accelerate", "none"
    path: str | None = None
    note: str = ""


_loaded: BlasInfo | None = None


def _candidates() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    prefixes = {sys.prefix, sys.base_prefix}
    for prefix in prefixes:
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            out.append(("mkl", path))
    system_dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ]
    for d in system_dirs:
        for pattern in ("openblas-pthread/libblas.so.3", "libopenblas.so.0", "libopenblas.so"):
            out.append(("openblas", os.path.join(d, pattern)))
    return [(n, p) for n, p in out if os.path.exists(p)]


def preferred_library() -> str | None:
    """The BLAS library preload() would try first here (for LD_PRELOAD into another process,
    e.g. the bench's reference server); None when there is none to load."""
    choice = os.environ.get("MLXD_BLAS", "auto")
    if sys.platform == "darwin" or choice == "none":
        return None
    if os.path.sep in choice:
        return choice
    cands = [p for n, p in _candidates() if choice == "auto" or n == choice]
    return cands[0] if cands else None


def preload() -> BlasInfo:
    """Load the best BLAS once per process; safe to call many times. Honours MLXD_BLAS=none|mkl|openblas|PATH."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if sys.platform == "darwin":
        _loaded = BlasInfo("accelerate", note="macOS: MLX uses Metal / Accelerate")
        return _loaded
    if "mlx.core" in sys.modules:
        _loaded = BlasInfo("bundled", note="mlx was imported before the BLAS preload")
        log.warning("mlx was imported before mlxd could load an optimized BLAS")
        return _loaded
    choice = os.environ.get("MLXD_BLAS", "auto")
    if choice == "none":
        _loaded = BlasInfo("bundled", note="MLXD_BLAS=none")
        return _loaded
    if os.path.sep in choice:
        cands = [("custom", choice)]
    else:
        cands = [c for c in _candidates() if choice == "auto" or c[0] == choice]
    for name, path in cands:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:  # a broken or foreign-arch library: try the next one
            log.debug("could not load %s: %s", path, e)
            continue
        _loaded = BlasInfo(name, path)
        return _loaded
    hint = ""
    if platform.machine() in ("x86_64", "AMD64"):
        hint = "pip install 'mlxd[fastblas]' (MKL) or apt-get install libopenblas0-pthread"
    elif sys.platform.startswith("linux"):
        hint = "apt-get install libopenblas0-pthread"
    _loaded = BlasInfo("bundled", note=f"reference BLAS; for speed: {hint}" if hint else "")
    return _loaded


def measure_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 n x n matmul throughput on the default device, in GFLOP/s."""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    dt = (time.perf_counter() - t) / repeats
    return 2 * n**3 / dt / 1e9
