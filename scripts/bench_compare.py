"""`make bench`: our server and mlx-lm's own server on the same weights, the same load, one table.

Steps: start `mlxd serve` on a free port (the default model, imported on first run); save a
dequantized fp32 copy of that model for mlx-lm (cached under .bench/); start
`python -m mlx_lm server` with the same BLAS preloaded (LD_PRELOAD of the MKL our models/blas.py
loads); run `mlxd bench --compare` against both; stop both servers. Results: .bench/results.json.

    python scripts/bench_compare.py [--concurrency 1,4,16] [--max-tokens 64] [bench options...]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".bench"
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not ready within {timeout:.0f} s")


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run a server for the duration of the block; SIGTERM (then SIGKILL) this one process."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def mkl_path() -> str | None:
    """The MKL that models/blas.py preloads in our server, for mlx-lm's server too."""
    for prefix in {sys.prefix, sys.base_prefix}:
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return found[0]
    return None


def prepare_mlxlm_copy(src: Path, dst: Path) -> None:
    """Save an fp32, dequantized, mlx-lm-loadable copy of `src` at `dst` (in a child process,
    so this orchestrator never imports mlx)."""
    if (dst / "config.json").exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    code = (
        "import models, sys\n"  # BLAS first, as everywhere
        "import mlx.core as mx\n"
        "from mlx.utils import tree_map\n"
        "from mlx_lm.utils import load, dequantize_model, save\n"
        "src, dst = sys.argv[1], sys.argv[2]\n"
        "model, tok, config = load(src, return_config=True)\n"
        "model = dequantize_model(model)\n"
        "model.update(tree_map(lambda a: a.astype(mx.float32)"
        " if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))\n"
        "config.pop('quantization', None); config.pop('quantization_config', None)\n"
        "config['torch_dtype'] = 'float32'\n"
        "save(dst, src, model, tok, config)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp)], check=True, cwd=ROOT)
    tmp.rename(dst)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="our model name (default: the configured default)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, bench_args = parse_args(argv)
    from models.names import model_dir  # no mlx: names only
    from server.settings import load_settings

    settings = load_settings()
    name = args.model or settings.default_model
    OUT.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p1, p2 = free_port(), free_port()
    ours = [sys.executable, "-m", "server.cli", "serve", "--port", str(p1), "--model", name]
    with running(ours, env, OUT / "mlxd.log") as proc1:
        print(f"starting mlxd on port {p1} (first run imports {name}) ...", flush=True)
        wait_ready(f"http://127.0.0.1:{p1}/health", proc1, args.startup_timeout, "mlxd serve")
        # Load the model (and import it if needed) before looking for its folder.
        httpx.post(
            f"http://127.0.0.1:{p1}/api/generate",
            json={"model": name, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
            timeout=args.startup_timeout,
        )
        src = model_dir(settings.models_dir, name)
        if not (src / "config.json").exists():
            print(f"make bench: model {name} is not in the models directory", file=sys.stderr)
            return 2
        dst = OUT / f"mlxlm-{src.name}-fp32"
        print(f"preparing an fp32 copy for mlx-lm at {dst} ...", flush=True)
        prepare_mlxlm_copy(src, dst)
        env2 = dict(env)
        mkl = mkl_path()
        if mkl:
            env2["LD_PRELOAD"] = mkl  # same BLAS as ours: compare servers, not BLAS libraries
        theirs = [sys.executable, "-m", "mlx_lm", "server", "--model", str(dst), "--port", str(p2)]
        with running(theirs, env2, OUT / "mlx_lm.log") as proc2:
            print(f"starting mlx-lm server on port {p2} ...", flush=True)
            wait_ready(
                f"http://127.0.0.1:{p2}/health", proc2, args.startup_timeout, "mlx_lm server"
            )
            from bench.cli import main as bench_main

            code = bench_main(
                [
                    "--url", f"http://127.0.0.1:{p1}", "--model", name,
                    "--compare", f"http://127.0.0.1:{p2}", "--compare-model", "default_model",
                    "--label", "mlxd", "--label", "mlx-lm",
                    "--json", str(OUT / "results.json"),
                    *bench_args,
                ]
            )  # fmt: skip
        # Structured output inside the batch: the same load on mlxd, half the requests
        # answering under a JSON schema, against none.
        print("mlxd with half the requests constrained by a JSON schema:", flush=True)
        code2 = bench_main(
            [
                "--url", f"http://127.0.0.1:{p1}", "--model", name,
                "--compare-constrained", "0.5",
                "--label", "free", "--label", "half constrained",
                "--json", str(OUT / "structured.json"),
                *bench_args,
            ]
        )  # fmt: skip
        return code or code2


if __name__ == "__main__":
    raise SystemExit(main())
