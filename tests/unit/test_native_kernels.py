"""The CPU kernels' SIMD paths against double-precision references, in a standalone C++ harness
(tests/native/): block-quantized dot products (float and int8 activations), the vectorized exp,
the activations, decode and prefill attention; each row alone gives the bits it gets in a batch.

arm64's NEON paths are cross-compiled (g++-aarch64-linux-gnu) and run under qemu-user, with and
without the ARMv8.2 dot-product instructions; the host's own path (AVX-512 VNNI, AVX2, ...) runs
natively. A variant whose compiler or emulator is missing skips and says which. The harness needs
MLX's headers only (the attention sources include them), not its library: it links statically
with MLX's symbols left unresolved, as nothing it runs calls into MLX."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = [
    "tests/native/main.cpp",
    "tests/native/check_qdot.cpp",
    "tests/native/check_attention.cpp",
]
KERNELS = [
    "qdot.cpp",
    "qdot_i8.cpp",
    "qdot_sdot.cpp",
    "activations.cpp",
    "pool.cpp",
    "attention_prefill.cpp",
]
# The extension's flags (kernels/CMakeLists.txt) but for the target.
FLAGS = ["-std=c++20", "-O3", "-ffp-contract=off", "-Wno-psabi", "-static", "-pthread"]
CROSS = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
APT = "apt-get install g++-aarch64-linux-gnu qemu-user"


def _mlx_include() -> Path | None:
    import mlx

    inc = Path(mlx.__path__[0]) / "include"
    return inc if (inc / "mlx" / "array.h").exists() else None


def _variants() -> list:
    cross_missing = [t for t in (CROSS, QEMU) if shutil.which(t) is None]
    cross_skip = pytest.mark.skipif(
        bool(cross_missing), reason=f"no {' or '.join(cross_missing)} on PATH (`{APT}`)"
    )
    host_ok = sys.platform == "linux" and shutil.which("c++") is not None
    host_skip = pytest.mark.skipif(
        not host_ok, reason="needs Linux and a C++ compiler (static link)"
    )
    native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
    return [
        pytest.param(
            CROSS,
            "-march=armv8.2-a+dotprod",
            [QEMU],
            "neon-dotprod",
            marks=cross_skip,
            id="neon-dotprod",
        ),
        pytest.param(CROSS, "-march=armv8-a", [QEMU], "neon", marks=cross_skip, id="neon"),
        pytest.param("c++", native, [], None, marks=host_skip, id="host"),
    ]


@pytest.mark.parametrize("cxx,arch,runner,path", _variants())
def test_native_kernel_checks(
    cxx: str, arch: str, runner: list[str], path: str | None, tmp_path: Path
) -> None:
    inc = _mlx_include()
    if inc is None:
        pytest.skip("the installed mlx ships no C++ headers (mlx/include)")
    exe = tmp_path / "check"
    sources = [str(ROOT / s) for s in HARNESS] + [str(ROOT / "kernels" / k) for k in KERNELS]
    cmd = [cxx, *FLAGS, arch, "-I", str(ROOT / "kernels"), "-I", str(inc), *sources]
    # MLX's symbols stay unresolved: nothing the harness runs calls into MLX.
    cmd += ["-Wl,--unresolved-symbols=ignore-all", "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    env = {**os.environ, "MLXD_KERNEL_THREADS": "2"}
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600, env=env)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and lines and lines[-1].endswith(" 0 failed"), (
        run.stdout[-3000:] + run.stderr[-2000:]
    )
    if path is not None:
        assert lines[0] == f"simd: {path}", lines[0]
