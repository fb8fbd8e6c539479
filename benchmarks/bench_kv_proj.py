"""All cross-attention K/V projections, forward+backward: one Triton launch vs per-layer nn.Linear.

Default: SD 2.1's 16 cross-attention layers (widths 320 x 5, 640 x 5, 1280 x 6; 64-wide heads),
context B=2, L=77, D=1024, gradients for the weights and the context. Rows go to
benchmarks/results/results.csv (name kv_proj_fwd_bwd). Without a GPU only the reference is timed.

    python benchmarks/bench_kv_proj.py [--batch 2] [--tokens 77] [--dim 1024] [--device auto]
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import write_rows
from kernel_timing import time_providers

from opad.devices import pick_device
from opad.kernels.kv_proj import kv_project

SD21_WIDTHS = [320] * 5 + [640] * 5 + [1280] * 6  # attn2 layers, in some order (order does not matter)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, generator=g).to(device).requires_grad_(True)
    weights = [(torch.randn(n, args.dim, generator=g) / args.dim**0.5).to(device).requires_grad_(True)
               for n in SD21_WIDTHS for _ in (0, 1)]
    heads = [n // 64 for n in SD21_WIDTHS for _ in (0, 1)]

    def step():
        outs = kv_project(x, weights, heads)
        torch.autograd.grad(outs, [x, *weights], [torch.ones_like(o) for o in outs])

    shape = f"B{args.batch},L{args.tokens},D{args.dim},{len(SD21_WIDTHS)}layers"
    rows = time_providers("kv_proj_fwd_bwd", shape, step, device, args.repeats)
    print(write_rows(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
