"""`mlxd doctor`: what this machine runs MLX on (backend, device, BLAS) and how fast a matmul is."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from models import blas
from models.memory import backend


@dataclass
class DoctorReport:
    mlx_version: str
    backend: str  # "metal", "cuda" or "cpu"
    device: str  # MLX's default device, e.g. "Device(gpu, 0)"
    blas_name: str  # "mkl", "openblas", "bundled", "accelerate", "none"
    blas_path: str | None
    blas_note: str
    gflops: float | None  # fp32 matmul throughput; None when not measured
    python: str
    machine: str
    kernels: str = ""  # mlxd's CPU kernels: "avx512, 2 threads" or why they are not used


def device_kind() -> str:
    """'gpu' when MLX's default device is a GPU (Metal or CUDA), else 'cpu'."""
    return "cpu" if backend() == "cpu" else "gpu"


def doctor(measure: bool = True, n: int = 1024) -> DoctorReport:
    """Report the runtime; `measure` times an n x n fp32 matmul (a second or so on a CPU)."""
    info = blas.preload()  # already done by `import models`; returns what was chosen
    import mlx.core as mx

    from models import qkernels

    if qkernels.available():
        kernels = f"{qkernels.simd_path()}, {qkernels.num_threads()} threads"
    else:
        kernels = f"{qkernels.unavailable_reason()}; quantized weights load as fp32 on the CPU"

    return DoctorReport(
        mlx_version=getattr(mx, "__version__", "unknown"),
        backend=backend(),
        device=str(mx.default_device()),
        blas_name=info.name,
        blas_path=info.path,
        blas_note=info.note,
        gflops=blas.measure_gflops(n) if measure else None,
        python=platform.python_version(),
        machine=f"{platform.system()} {platform.machine()}",
        kernels=kernels,
    )
