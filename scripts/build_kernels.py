"""Build mlxd's CPU kernels (kernels/, an MLX C++ extension) into models/_kernels*.so.

Run by `make install` (and `make kernels`). Never fails the install: when the build is not possible
(no compiler, no cmake, an MLX without its CMake config, a nanobind ABI mismatch) it writes the reason
to models/_kernels.json, mlxd runs on plain MLX ops and `mlxd doctor` shows the reason.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "kernels"
BUILD = ROOT / "build" / "kernels"
STATUS = ROOT / "models" / "_kernels.json"

# The nanobind release whose ABI the mlx wheel was built with (an extension built with another
# ABI loads but rejects every mlx.core.array argument). Newest mlx first; checked after the build.
NANOBIND_FOR_MLX = [("0.32", "3.0.1"), ("0.31", "3.0.1"), ("0.30", "2.10.2"), ("0.29", "2.4.0")]


def _write(ok: bool, reason: str = "", **extra: object) -> None:
    STATUS.write_text(json.dumps({"ok": ok, "reason": reason, **extra}, indent=2) + "\n")


def _run(cmd: list[str], log: list[str]) -> None:
    log.append("$ " + " ".join(cmd))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log.append(r.stdout[-4000:] + r.stderr[-4000:])
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` failed (exit {r.returncode})")


def _nanobind_pin(mlx_version: str) -> str:
    for prefix, nb in NANOBIND_FOR_MLX:
        if mlx_version.startswith(prefix + "."):
            return nb
    return NANOBIND_FOR_MLX[0][1]


_CHECK = """
import mlx.core as mx, numpy as np
from models import _kernels as k
mx.set_default_device(mx.cpu)
w = mx.random.normal((40, 96)); x = mx.random.normal((3, 96))
q, s, b = mx.quantize(w, group_size=32, bits=4)
ref = x @ mx.dequantize(q, s, b, group_size=32, bits=4).T
got = k.qmm(x, q, s, b, 4)
err = float(mx.abs(got - ref).max() / mx.abs(ref).max())
# Integer activations (VNNI and SDOT builds) round x to ~15 bits per 32-value block.
assert err < (1e-3 if k.simd_path() in ("avx512-vnni", "neon-dotprod") else 1e-4), err
print(k.simd_path())
"""


def build() -> tuple[bool, str, dict]:
    import mlx.core as mx

    extra: dict = {"mlx": mx.__version__, "machine": platform.machine()}
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return False, f"no `{tool}` on PATH (install cmake and a C++20 compiler)", extra
    import mlx

    mlx_dir = Path(mlx.__path__[0])
    if not (mlx_dir / "share" / "cmake" / "MLX" / "MLXConfig.cmake").exists():
        return False, "the installed mlx has no CMake config (mlx/share/cmake/MLX)", extra
    pin = _nanobind_pin(mx.__version__)
    extra["nanobind"] = pin
    log: list[str] = []
    try:
        _run([sys.executable, "-m", "pip", "install", "-q", f"nanobind=={pin}"], log)
        _run(
            [
                "cmake",
                "-S",
                str(SRC),
                "-B",
                str(BUILD),
                f"-DPython_EXECUTABLE={sys.executable}",
                "-DCMAKE_BUILD_TYPE=Release",
            ],
            log,
        )
        _run(["cmake", "--build", str(BUILD), "-j", "2"], log)
        built = sorted(BUILD.glob("_kernels*.so")) + sorted(BUILD.glob("_kernels*.pyd"))
        if not built:
            raise RuntimeError("the build produced no _kernels module")
        for old in (ROOT / "models").glob("_kernels*.so"):
            old.unlink()
        shutil.copy2(built[0], ROOT / "models" / built[0].name)
        r = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            for f in (ROOT / "models").glob("_kernels*.so"):
                f.unlink()
            tail = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"the built module fails its check ({tail}); nanobind ABI?")
        extra["simd"] = r.stdout.strip()
        (BUILD.parent / "kernels-build.log").unlink(missing_ok=True)
        return True, "", extra
    except RuntimeError as e:
        (BUILD.parent / "kernels-build.log").parent.mkdir(parents=True, exist_ok=True)
        (BUILD.parent / "kernels-build.log").write_text("\n".join(log))
        extra["log"] = str(BUILD.parent / "kernels-build.log")
        return False, str(e), extra


def main() -> int:
    t = time.perf_counter()
    try:
        ok, reason, extra = build()
    except Exception as e:  # noqa: BLE001 - never break `make install`
        ok, reason, extra = False, f"{type(e).__name__}: {e}", {}
    _write(ok, reason, **extra)
    if ok:
        print(f"mlxd kernels built ({extra.get('simd')}) in {time.perf_counter() - t:.0f} s")
    else:
        print(f"mlxd kernels not built: {reason}. mlxd runs on plain MLX ops.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
