"""Microbenchmark: mlxd's quantized CPU matmul against fp32 BLAS and mx.quantized_matmul.

SmolLM2-135M's shapes (576x1536, 1536x576 and the 49152x576 lm_head) at 1, 4 and 16 rows, all in one
run so the numbers compare side by side. Usage: .venv/bin/python scripts/bench_kernels.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.blas import preload  # noqa: E402

preload()

import mlx.core as mx  # noqa: E402

from models import qkernels  # noqa: E402

CLOCK = time.perf_counter


def _time(fn, repeats: int) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(3):
        t = CLOCK()
        for _ in range(repeats):
            mx.eval(fn())
        best = min(best, (CLOCK() - t) / repeats)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="process CPU time instead of wall time (a busy shared machine; run with "
        "MLXD_KERNEL_THREADS=1 MKL_NUM_THREADS=1 to compare single-thread cost)",
    )
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    mx.set_default_device(mx.cpu)
    if not qkernels.available():
        print(f"kernels not available: {qkernels.unavailable_reason()}")
    shapes = [("576x1536 (gate/up)", 1536, 576), ("1536x576 (down)", 576, 1536)]
    shapes.append(("49152x576 (lm_head)", 49152, 576))
    print(f"simd: {qkernels.simd_path()}, threads: {qkernels.num_threads()}")
    cols = ("fp32 BLAS", "mx q4", "ours q4", "ours q8")
    print(f"{'matmul (ms)':<22}{'rows':>5}" + "".join(f"{c:>11}" for c in cols))
    for label, n, k in shapes:
        w = mx.random.normal((n, k)) * 0.05
        wt = mx.contiguous(w.T)  # the fp32 path's layout (models/cpu_layout.py)
        packs = {bits: mx.quantize(w, group_size=32, bits=bits) for bits in (4, 8)}
        mx.eval(wt, packs)
        for m in [int(r) for r in args.rows.split(",")]:
            x = mx.random.normal((m, k))
            reps = max(2, args.repeats // (8 if n > 10000 else 1))
            q4 = packs[4]
            cells = [
                _time(lambda x=x, wt=wt: x @ wt, reps),
                _time(lambda x=x, q=q4: mx.quantized_matmul(x, *q, True, 32, 4), max(2, reps // 4)),
            ]
            for bits in (4, 8):
                if qkernels.available():
                    cells.append(
                        _time(lambda x=x, b=bits, p=packs: qkernels.qmm(x, *p[b], b), reps)
                    )
                else:
                    cells.append(float("nan"))
            print(f"{label:<22}{m:>5}" + "".join(f"{c:>11.3f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
