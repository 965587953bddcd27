"""llama.cpp's `llama-server` as a benchmark peer: built once from source, cached, then reused.

The source is the llama.cpp vendored in the `llama-cpp-python` source distribution (PyPI is
the one registry reachable everywhere we run). The binary lands in
~/.cache/mlxd/llama.cpp/<version>/llama-server, built with the CPU features of this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlxd" / "llama.cpp"


def cached_binary(root: Path | None = None) -> Path | None:
    """The llama-server of the highest version already built under the cache, if any."""
    root = root or cache_root()
    found = sorted(root.glob("*/llama-server"), key=lambda p: _version_key(p.parent.name))
    return found[-1] if found else None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.+-]", version))


def cmake_args(source: Path, build: Path) -> list[str]:
    """Configure only what the server needs: native CPU flags, static, no network at build or
    run time (no curl, no OpenSSL, no prebuilt web UI download)."""
    return [
        "cmake", "-S", str(source), "-B", str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]  # fmt: skip


def _download_sdist(dest: Path, version: str) -> Path:
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    subprocess.run([*cmd, "-d", str(dest), spec], check=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download {spec} produced no source distribution")
    return found[-1]


def _extract_vendored(sdist: Path, dest: Path) -> tuple[Path, str]:
    """Extract vendor/llama.cpp only; returns (its folder, the package version)."""
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
        if not members:
            raise RuntimeError(f"{sdist.name} holds no vendor/llama.cpp")
        tar.extractall(dest, members=members, filter="data")
    return dest / top / "vendor" / "llama.cpp", top.split("-", 1)[1]


def build(version: str = "", jobs: int = 2, root: Path | None = None) -> Path:
    """Download the sdist, build the llama-server target, copy it to <root>/<version>/."""
    root = root or cache_root()
    with tempfile.TemporaryDirectory(prefix="mlxd-llama-") as tmp:
        work = Path(tmp)
        print(f"building llama-server from {PACKAGE} (about 10 min on 2 cores) ...", flush=True)
        source, got = _extract_vendored(_download_sdist(work, version), work)
        target = root / got / "llama-server"
        if target.exists():
            return target
        out = work / "build"
        subprocess.run(cmake_args(source, out), check=True, stdout=subprocess.DEVNULL)
        cmd = ["cmake", "--build", str(out), "--target", "llama-server", f"-j{jobs}"]
        subprocess.run(cmd, check=True)
        binary = out / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").rename(target)
    return target


def ensure_server(version: str = "", jobs: int = 2) -> Path:
    """A cached llama-server (any version when none is asked for), built on first use."""
    if version:
        wanted = cache_root() / version / "llama-server"
        return wanted if wanted.exists() else build(version, jobs)
    return cached_binary() or build(version, jobs)


def server_command(
    binary: Path, gguf: Path, port: int, slots: int = 16, threads: int = 2, slot_ctx: int = 1024
) -> list[str]:
    """llama-server on 127.0.0.1 with `slots` parallel sequences of `slot_ctx` tokens each (the
    context is shared among slots, so it is their product)."""
    return [
        str(binary), "-m", str(gguf),
        "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-t", str(threads), "-c", str(slots * slot_ctx),
        "--alias", "smollm2", "--no-webui",
    ]  # fmt: skip
