"""Cross-build mlxd's CPU kernels for Linux arm64 and run them there, under qemu-user.

An opt-in check for developers on x86-64 Linux (`make kernels-arm64`; not part of `make test`):
downloads the aarch64 wheels of the installed mlx version (mlx and mlx-cpu: headers, CMake
config, libmlx and its BLAS), builds kernels/ with the cross compiler exactly as `make install`
builds it on an arm64 machine (kernels/CMakeLists.txt, for --march instead of the build machine's
CPU), links tests/native/arm64_e2e.cpp against the built objects and that libmlx, and runs it
under qemu-aarch64: the primitives through MLX's own evaluation against MLX's reference ops.
Needs g++-aarch64-linux-gnu, qemu-user and cmake (apt), and PyPI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "arm64"
CXX = "aarch64-linux-gnu-g++"
SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's cross libc and libstdc++, for qemu
PLATFORM = "manylinux_2_35_aarch64"

TOOLCHAIN = f"""set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER {CXX})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
"""


def _run(cmd: list[str], **kw: object) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def wheels(ver: str) -> Path:
    """The aarch64 mlx and mlx-cpu wheels of version `ver`, unpacked; returns the site folder."""
    site = OUT / f"site-{ver}"
    if (site / "mlx" / "lib" / "libmlx.so").exists():
        return site
    dl = OUT / "wheels"
    pkgs = [f"mlx=={ver}", f"mlx-cpu=={ver}"]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            *pkgs,
            "--platform",
            PLATFORM,
            "--only-binary=:all:",
            "--no-deps",
            "-d",
            str(dl),
        ]
    )
    for whl in dl.glob(f"*{ver}*aarch64.whl"):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    return site


def build(site: Path, march: str) -> Path:
    """kernels/ for `march` against the wheel's MLX; returns the build folder."""
    import sysconfig

    bdir = OUT / f"build-{march.replace('+', '-')}"
    tc = OUT / "toolchain.cmake"
    tc.write_text(TOOLCHAIN)
    _run(
        [
            "cmake",
            "-S",
            str(ROOT / "kernels"),
            "-B",
            str(bdir),
            f"-DCMAKE_TOOLCHAIN_FILE={tc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            # Cross builds do not ask the interpreter for its headers (only nanobind's glue uses them).
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DMLX_DIR={site / 'mlx' / 'share' / 'cmake' / 'MLX'}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DMLXD_NATIVE=OFF",
            f"-DCMAKE_CXX_FLAGS=-march={march}",
        ]
    )
    _run(["cmake", "--build", str(bdir), "-j", "2"])
    return bdir


def run_driver(site: Path, bdir: Path, march: str) -> int:
    objs = sorted(
        str(o)
        for o in (bdir / "CMakeFiles" / "_kernels.dir").glob("*.o")
        if "bindings" not in o.name
    )
    exe = bdir / "arm64_e2e"
    _run(
        [
            CXX,
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-Wno-psabi",
            f"-march={march}",
            "-I",
            str(ROOT / "kernels"),
            "-I",
            str(site / "mlx" / "include"),
            str(ROOT / "tests" / "native" / "arm64_e2e.cpp"),
            *objs,
            "-L",
            str(site / "mlx" / "lib"),
            "-lmlx",
            f"-Wl,-rpath-link,{site / 'mlx_cpu.libs'}",
            "-pthread",
            "-o",
            str(exe),
        ]
    )
    libs = f"{site / 'mlx' / 'lib'}:{site / 'mlx_cpu.libs'}"
    env = {**os.environ, "QEMU_LD_PREFIX": str(SYSROOT), "LD_LIBRARY_PATH": libs}
    print(f"$ qemu-aarch64 {exe}", flush=True)
    return subprocess.run(["qemu-aarch64", str(exe)], env=env).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--march", default="armv8.2-a+dotprod", help="e.g. armv8-a (no SDOT)")
    args = p.parse_args()
    missing = [t for t in (CXX, "qemu-aarch64", "cmake") if shutil.which(t) is None]
    if missing or not SYSROOT.exists():
        print(
            f"needs {', '.join(missing) or SYSROOT}: apt-get install g++-aarch64-linux-gnu "
            "qemu-user cmake",
            file=sys.stderr,
        )
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    site = wheels(version("mlx"))
    bdir = build(site, args.march)
    return run_driver(site, bdir, args.march)


if __name__ == "__main__":
    sys.exit(main())
