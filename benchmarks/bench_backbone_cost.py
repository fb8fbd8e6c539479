"""What each discriminator / identity backbone costs: parameters, weight memory, forward FLOPs, CPU time.

Parameters and FLOPs are counted on the meta device (nothing is allocated, no weights needed) at
each backbone's input size for one image (torch.utils.flop_counter; a multiply-add is 2 FLOPs).
Training runs each backbone forward + backward to the image about three times per image per
iteration (the student's image for the generator, real and fake for the discriminator), and the
backward costs about twice the forward. The small backbones are also timed on this machine
(forward + gradient to the input, batch 1; --time-all times every one); those rows go to
benchmarks/results/results.csv as backbone/<name>, provider torch, shape b1x<size>px. A markdown table is
printed.

    python benchmarks/bench_backbone_cost.py
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch
from common import device_name, measure, write_rows
from torch.utils.flop_counter import FlopCounterMode

from opad.models.towers import ImageProjection, clip_vision_tower


def _timm(name: str):
    return lambda: timm.create_model(name, pretrained=False, num_classes=0)


# (row name, description, input size, builder of the bare encoder)
BACKBONES = [
    ("dino_v1_ViT-S-16", "dino_v1 ViT-S/16 (vit_small_patch16_224.dino)", 224, _timm("vit_small_patch16_224.dino")),
    ("dino_v2_ViT-S-14", "dino_v2 ViT-S/14 (--dino-v2-size small)", 518, _timm("vit_small_patch14_dinov2.lvd142m")),
    ("dino_v2_ViT-L-14", "dino_v2 ViT-L/14 (default; the paper's)", 518, _timm("vit_large_patch14_dinov2.lvd142m")),
    ("clip_ViT-B-16", "clip ViT-B-16 (--clip-arch ViT-B-16)", 224, lambda: clip_vision_tower("ViT-B-16")),
    ("clip_ViT-H-14", "clip ViT-H-14 (default), pooled 1024-d", 224, lambda: clip_vision_tower("ViT-H-14")),
    ("clip_ViT-H-14+ip_adapter", "clip ViT-H-14 + IP-Adapter projection (default), 4x768", 224,
     lambda: torch.nn.Sequential(clip_vision_tower("ViT-H-14"), ImageProjection(1024, 4, 768))),
]


def count(build, size: int) -> tuple[int, float]:
    """(parameters, forward GFLOPs for one image), counted on the meta device."""
    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-time", action="store_true", help="only count parameters and FLOPs")
    p.add_argument("--time-all", action="store_true", help="also time the big backbones (minutes on a CPU)")
    p.add_argument("--time-below", type=float, default=150e6, help="time backbones with fewer parameters")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    rows = []
    table = ["| backbone | input | parameters | weights fp32 / bf16 | forward GFLOPs / image | "
             "CPU fwd + input grad, batch 1 |", "|---|---|---|---|---|---|"]
    for row_name, description, size, build in BACKBONES:
        params, gflops = count(build, size)
        cpu = "not timed"
        if not args.no_time and (args.time_all or params < args.time_below):
            torch.manual_seed(0)
            model = build().eval().requires_grad_(False)
            x = torch.rand(1, 3, size, size, requires_grad=True)
            timing = measure(lambda: model(x).sum().backward(), device, warmup=1, repeats=args.repeats)
            rows.append({"name": f"backbone/{row_name}", "provider": "torch", "shape": f"b1x{size}px", **timing})
            cpu = f"{timing['median_ms'] / 1000:.2f} s"
            del model
        table.append(f"| {description} | {size} px | {params / 1e6:.1f} M | {params * 4 / 2**30:.2f} / "
                     f"{params * 2 / 2**30:.2f} GiB | {gflops:.1f} | {cpu} |")
        print(table[-1], file=sys.stderr, flush=True)
    if rows:
        print(f"wrote {len(rows)} rows to {write_rows(rows, device)}", file=sys.stderr)
    print(f"\nDevice for the timings: {device_name(device)}\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
