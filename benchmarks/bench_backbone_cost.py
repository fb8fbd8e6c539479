"""What each discriminator / identity backbone costs: parameters, weight memory, forward FLOPs.

Parameters and FLOPs are counted on the meta device (nothing is allocated), at each backbone's
input size, for one image; training runs each backbone forward + backward to the image about
three times per iteration per image (student image for G, real and fake for D). The small ones are
also timed here (forward + input gradient, batch 1) unless --no-time. Rows (name backbone/..., the
FLOPs in the shape column) go to benchmarks/results.csv; a markdown table is printed.

    python benchmarks/bench_backbone_cost.py
"""

from __future__ import annotations

import argparse
import sys

import open_clip
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import measure, write_rows
from opad.backbones import ImageProjection, _clip_vision_tower

# (row name, what, input size, builder)
BACKBONES = [
    ("dino_v1 ViT-S/16", 224, lambda: timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)),
    ("dino_v2 ViT-S/14 (--dino-v2-size small)", 518,
     lambda: timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)),
    ("dino_v2 ViT-L/14 (default)", 518,
     lambda: timm.create_model("vit_large_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)),
    ("clip ViT-B-16 (--clip-arch ViT-B-16)", 224, lambda: _clip_vision_tower("ViT-B-16")),
    ("clip ViT-H-14 + IP-Adapter projection (default)", 224,
     lambda: torch.nn.Sequential(_clip_vision_tower("ViT-H-14"), ImageProjection(1024, 4, 768))),
]


def count(build, size: int) -> tuple[int, float]:
    """(parameters, forward GFLOPs for one image) on the meta device."""
    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-time", action="store_true", help="skip the CPU timings")
    p.add_argument("--time-below", type=float, default=150e6, help="time only backbones with fewer parameters")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    rows, table = [], ["| backbone | input | parameters | weights fp32 / bf16 | forward GFLOPs / image | "
                       "CPU fwd+bwd, batch 1 |", "|---|---|---|---|---|---|"]
    for name, size, build in BACKBONES:
        params, gflops = count(build, size)
        timing = {"median_ms": float("nan"), "p20_ms": float("nan"), "p80_ms": float("nan"), "peak_mem_mb": float("nan")}
        if not args.no_time and params < args.time_below:
            model = build().eval().requires_grad_(False)
            x = torch.rand(1, 3, size, size, requires_grad=True)
            timing = measure(lambda: model(x).sum().backward(), device, warmup=1, repeats=3)
        rows.append({"name": f"backbone/{name.split(' (')[0].replace(' ', '_')}", "provider": "torch",
                     "shape": f"b1x{size}px,{params / 1e6:.1f}M params,{gflops:.1f} GFLOP fwd", **timing})
        cpu = f"{timing['median_ms'] / 1000:.2f} s" if timing["median_ms"] == timing["median_ms"] else "not timed"
        table.append(f"| {name} | {size} px | {params / 1e6:.0f} M | {params * 4 / 2**30:.2f} / "
                     f"{params * 2 / 2**30:.2f} GiB | {gflops:.0f} | {cpu} |")
        print(table[-1], file=sys.stderr)
    path = write_rows(rows, device)
    print("\n".join(table))
    print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
