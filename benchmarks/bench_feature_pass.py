"""The fused multi-backbone feature pass (opad._C) vs the torch reference (interpolate + normalise
per backbone, gradients summed by autograd), and the whole backbone ensemble around it.

Default: a 2x3x512² image (the student's decode) -> the three backbone inputs {224 DINO,
518 DINOv2, 224 CLIP}, antialiased, each with its mean/std. Rows (benchmarks/results/results.csv):

- ``feature_pass_fwd`` / ``feature_pass_fwd_bwd``: the op alone;
- ``ensemble_fwd_bwd``: every backbone's features of the image and the image gradient, i.e.
  :func:`opad.models.backbones.backbone_features` (fused pass; encoders on their own CUDA streams on a
  GPU) vs one backbone at a time. ``--backbones tiny`` (the CPU default) uses the tiny preset's
  ViTs at the real input sizes; ``real`` (the GPU default) the real architectures with random
  weights (ViT-S/16, ViT-L/14 at 518, open_clip ViT-H-14): nothing is downloaded.

    python benchmarks/bench_feature_pass.py [--batch 2] [--size 512] [--backbones auto|tiny|real] [--device auto]
"""

from __future__ import annotations

import argparse
import sys

import open_clip
import timm
import torch
from common import write_rows
from kernel_timing import time_providers

from opad.devices import pick_device
from opad.kernels.feature_pass import BackboneInput, feature_pass
from opad.models.backbones import FrozenBackbone, backbone_features, build_backbone
from opad.models.towers import IMAGENET_MEAN, IMAGENET_STD, clip_vision_tower

CLIP_MEAN, CLIP_STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
INPUTS = [BackboneInput(224, "antialias", IMAGENET_MEAN, IMAGENET_STD),  # dino_v1
          BackboneInput(518, "antialias", IMAGENET_MEAN, IMAGENET_STD),  # dino_v2
          BackboneInput(224, "antialias", CLIP_MEAN, CLIP_STD)]  # clip
MODES = {"reference": "reference", "opad._C": "triton"}  # OPAD_KERNELS=triton forces the extension


def real_backbones() -> list[FrozenBackbone]:
    """The paper's three backbone architectures, random weights (timing only)."""
    dino = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    dino2 = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    clip = clip_vision_tower("ViT-H-14")
    return [FrozenBackbone("dino_v1", dino, 224, IMAGENET_MEAN, IMAGENET_STD),
            FrozenBackbone("dino_v2", dino2, 518, IMAGENET_MEAN, IMAGENET_STD),
            FrozenBackbone("clip", clip, 224, CLIP_MEAN, CLIP_STD)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--backbones", choices=("auto", "tiny", "real"), default="auto",
                   help="the ensemble row's backbones (auto: real on a GPU, tiny on the CPU)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    grads = [torch.randn(args.batch, 3, s.size, s.size, generator=g).to(device) for s in INPUTS]
    shape = f"{args.batch}x3x{args.size}x{args.size}->" + "/".join(str(s.size) for s in INPUTS)
    x = image.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            feature_pass(image, INPUTS)

    def forward_backward():
        torch.autograd.grad(feature_pass(x, INPUTS), x, grads)

    rows = time_providers("feature_pass_fwd", shape, forward, device, args.repeats, MODES)
    rows += time_providers("feature_pass_fwd_bwd", shape, forward_backward, device, args.repeats, MODES)

    kind = args.backbones if args.backbones != "auto" else ("real" if device.type == "cuda" else "tiny")
    if kind == "real":
        backbones = real_backbones()
    else:
        backbones = [build_backbone(n, "tiny", dino_v2_size="small") for n in ("dino_v1", "dino_v2", "clip")]
    backbones = [b.to(device) for b in backbones]
    uses = [(b, None) for b in backbones]

    def ensemble():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = backbone_features(x, uses)
        torch.autograd.grad(sum(f.float().square().mean() for f in feats), x)

    rows += time_providers("ensemble_fwd_bwd", f"{shape},{kind}", ensemble, device, args.repeats, MODES)
    print(write_rows(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
