"""GGUF imports in a child process, so that an import never holds the server's GIL.

A GGUF import only writes files (models/gguf.py), but in the server's process its pure-Python
reader, `mx.load` of the file and `mx.save_safetensors` of the result hold the GIL for stretches
of up to ~0.6 s, stalling every stream meanwhile. The child runs the same `import_gguf`, at a
lower CPU priority (streams come first on a busy CPU), and reports to the parent on its stdout,
one JSON object a line (no pickle): {"progress": [done, total, what]}, then {"config": {...}} or
{"error": "message"}. Its stderr (warnings, a traceback) goes to the parent's log at debug level.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from models.errors import ImportFailedError
from models.gguf import Progress, import_gguf

log = logging.getLogger("mlxd.gguf")

NICENESS = 10  # how much lower the child's CPU priority is than the server's
STOP_SECONDS = 30.0  # a child told to stop gets this long to clean up before it is killed
_ROOT = Path(__file__).resolve().parent.parent  # where `models` imports from


def import_gguf_isolated(
    gguf_path: str | Path, dest_dir: str | Path, progress: Progress | None = None
) -> dict[str, Any]:
    """`models.gguf.import_gguf` in a child process: the same arguments, result and errors
    (ImportFailedError); progress is called on this thread as the child reports it. The child
    is stopped if this thread stops early (an exception raised by `progress`, say)."""
    # Run from the folder `models` comes from: `-m` puts the working directory first on the path.
    paths = [str(Path(p).absolute()) for p in (gguf_path, dest_dir)]
    cmd = [sys.executable, "-m", "models.gguf_process", *paths]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=_ROOT
        )
        try:
            assert proc.stdout is not None
            result = _read_reports(proc.stdout, progress)
            code = proc.wait()
        finally:
            _stop(proc)
        if "config" in result and code == 0:
            return dict(result["config"])
        stderr.seek(0)
        log.debug("GGUF import process (exit %s): %s", code, _tail(stderr))
    if "error" in result:
        raise ImportFailedError(str(result["error"]))
    raise ImportFailedError(f"GGUF import failed (its process exited with status {code})")


def _stop(proc: subprocess.Popen) -> None:
    """End a child still running: SIGTERM lets it remove its temporary folder (see main)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_reports(out: IO[bytes], progress: Progress | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for line in out:
        try:
            report = json.loads(line)
        except ValueError:
            continue  # not ours: the child's stdout carries only reports, but be lenient
        if not isinstance(report, dict):
            continue
        if "progress" in report and progress is not None:
            done, total, what = report["progress"]
            progress(int(done), int(total), str(what))
        result.update((k, v) for k, v in report.items() if k in ("config", "error"))
    return result


def _tail(stream: IO[bytes], chars: int = 2000) -> str:
    return stream.read().decode(errors="replace")[-chars:]


def main(argv: list[str]) -> int:
    """The child: import argv[0] into argv[1], reporting on stdout (see the module doc)."""
    # Reports get their own copy of stdout; anything a library prints goes to stderr instead.
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        os.nice(NICENESS)
    except OSError:
        pass  # not allowed here: run at the same priority
    signal.signal(signal.SIGTERM, _interrupted)

    def report(**fields: Any) -> None:
        reports.write(json.dumps(fields) + "\n")

    try:
        config = import_gguf(argv[0], argv[1], progress=lambda d, t, w: report(progress=[d, t, w]))
    except ImportFailedError as e:
        report(error=str(e))
        return 1
    report(config=config)
    return 0


def _interrupted(signum: int, frame: Any) -> None:
    # Raised where the import is: it removes its temporary folder as for any failure.
    raise ImportFailedError("the import was stopped")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
