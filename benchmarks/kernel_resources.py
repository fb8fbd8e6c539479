"""Registers, spills and shared memory of every Triton kernel variant of opad, for sm_80 and sm_90.

Compiles, without a GPU, every launch the wrappers can make (opad.kernels.aot: the register sort
at every block size up to opad.kernels._swd_triton.REGISTER_SORT_CAP with its warp count, the projections at
the patch sizes in use, the K/V kernels for every context/weight dtype pair) and writes one row per
kernel variant and arch to benchmarks/results/kernel_resources.csv (replaced, not appended: the table
describes the code as it is). Exits 1 on a compile error or a register spill.

    python benchmarks/kernel_resources.py [--out benchmarks/results/kernel_resources.csv] [--workers N] [--arch 80 90]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from opad.kernels import aot

OUT = Path(__file__).resolve().parent / "results" / "kernel_resources.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    p.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), help="compute capabilities, e.g. 80 90")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = aot.compile_all(aot.variants(), tuple(args.arch), args.workers)
    print(aot.table(rows))
    v = aot.versions()
    path = aot.write_csv(rows, args.out, **v, date=str(datetime.date.today()))
    print(f"\n{len(rows)} compiles in {time.perf_counter() - start:.0f} s (triton {v['triton']}, ptxas {v['ptxas']}); "
          f"wrote {path}")
    bad = aot.problems(rows)
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
