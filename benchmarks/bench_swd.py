"""MS-SWD forward+backward, Triton kernel vs the torch reference, at the training size.

Default: 2 x 3 x 512 x 512, 5 scales, 128 directions, 11 x 11 patches (the paper's). Rows go to
benchmarks/results/results.csv (name ms_swd_fwd_bwd, provider reference|triton). Without a GPU only the
reference is timed: the kernel runs on the CPU only in Triton's interpreter, which measures nothing.

    python benchmarks/bench_swd.py [--size 512] [--batch 2] [--repeats 5] [--device auto]
    python benchmarks/bench_swd.py --sort-sweep    # GPU: in-register vs torch sort per level size

The sweep times the kernel's sort-and-reduce step alone for one chunk of directions at every
pyramid level's size (rows swd_sort, providers registers|torch): opad.kernels._swd_triton.REGISTER_SORT_MAX
should be the largest size at which registers win. The register sort is timed only up to
opad.kernels._swd_triton.REGISTER_SORT_CAP (4096), the largest size it compiles for without spilling
(benchmarks/results/kernel_resources.csv); larger levels time torch's sort alone.
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import write_rows
from kernel_timing import time_op, time_providers

from opad.devices import pick_device
from opad.train import losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--scales", type=int, default=5)
    p.add_argument("--projections", type=int, default=128)
    p.add_argument("--patch", type=int, default=11)
    p.add_argument("--repeats", type=int, default=5, help="timed calls on the CPU (Triton's timer picks its own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sort-sweep", action="store_true", help="time the two sort paths per level size (GPU)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.sort_sweep:
        return sort_sweep(args, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device).requires_grad_(True)
    y = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    projections = [losses.random_projections(args.projections, 3, args.patch, generator=g).to(device)
                   for _ in range(args.scales)]

    def step():
        x.grad = None
        losses.ms_swd(x, y, num_scales=args.scales, projections=projections).sum().backward()

    shape = f"{args.batch}x3x{args.size}x{args.size},P{args.projections},k{args.patch},s{args.scales}"
    rows = time_providers("ms_swd_fwd_bwd", shape, step, device, args.repeats)
    print(write_rows(rows, device))
    return 0


def sort_sweep(args, device: torch.device) -> int:
    if device.type != "cuda":
        print("error: --sort-sweep times Triton kernels and needs a CUDA GPU", file=sys.stderr)
        return 2
    from opad.kernels import _swd_triton as swd  # the kernel's own sort step

    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for level in range(args.scales):
        side = args.size >> level
        n = side * side
        px, py = (torch.randn(args.batch, swd.CHUNK, n, generator=g, device=device) for _ in range(2))
        sign = torch.empty(args.batch, swd.CHUNK, n, device=device, dtype=torch.int8)
        for provider, limit in (("registers", n), ("torch", 0)):
            if provider == "registers" and n > swd.REGISTER_SORT_CAP:
                continue  # spills past it (8192), and ptxas runs for minutes at 16384
            rows.append({"name": "swd_sort", "provider": provider, "shape": f"{args.batch}x{swd.CHUNK}x{n}",
                         **time_op(lambda: swd._sorted_diff(px, py, sign, 0, limit), device, args.repeats)})
            print(f"{n:8d} {provider:9s} {rows[-1]['median_ms']:9.3f} ms", file=sys.stderr)
    print(write_rows(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
