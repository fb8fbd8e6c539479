"""The frozen networks OPAD's losses look through: the discriminators' and the identity loss's
image backbones, and LPIPS. Built once, when the method is (their weights never train)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from opad.config import DISCRIMINATORS, TrainConfig
from opad.errors import OpadError
from opad.models.backbones import FrozenBackbone, build_backbone
from opad.presets import Preset


def build_backbones(cfg: TrainConfig, preset: Preset | None, device: torch.device,
                    gradient_checkpointing: bool) -> dict[str, FrozenBackbone]:
    """Each discriminator's backbone, and the identity encoder's (when the identity loss is on)."""
    names = list(cfg.discriminators)
    if cfg.use_teacher and cfg.id_weight > 0 and cfg.id_encoder not in names:
        names.append(cfg.id_encoder)
    sources = {**(preset.backbones() if preset else {}), **cfg.backbone_sources()}
    backbones = {}
    for name in names:
        source = sources.get(name)
        if source is None:
            raise OpadError(f"the {name} backbone needs weights: pass --backbone-weights {name}=FILE "
                            f"(or {name}=hub to download them)")
        backbones[name] = build_backbone(
            name, source, dino_v2_size=cfg.dino_v2_size, clip_arch=cfg.clip_arch, normalize=cfg.disc_normalize,
            resize=cfg.backbone_resize, ip_adapter=ip_adapter_source(cfg, source) if name == "clip" else None,
            seed=cfg.seed + 31 * (DISCRIMINATORS.index(name) + 1)).to(device)
        if gradient_checkpointing:  # the student's image backpropagates through every backbone
            backbones[name].set_grad_checkpointing()
    return backbones


def ip_adapter_source(cfg: TrainConfig, clip_source: str) -> str | None:
    """What ``--ip-adapter auto`` means: a random tiny projection on the tiny clip backbone,
    IP-Adapter's own when the clip backbone is IP-Adapter's image encoder (ViT-H-14), else none."""
    choice = cfg.ip_adapter
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    if clip_source == "tiny":
        return "tiny"
    if cfg.clip_arch != "ViT-H-14" or not (clip_source.startswith("hub") or Path(clip_source).exists()):
        return None  # a missing weights file is the first problem to report (build_backbone does)
    if clip_source.startswith("hub"):
        return "hub"
    beside = [Path(clip_source).parent / f"ip-adapter_sd15{ext}" for ext in (".safetensors", ".bin")]
    found = [str(p) for p in beside if Path(clip_source).is_dir() and p.is_file()]
    if found:
        return found[0]
    raise OpadError("the clip backbone needs IP-Adapter's image projection for the identity feature: pass "
                    "--ip-adapter FILE (ip-adapter_sd15.safetensors) or hub, or --ip-adapter none for the "
                    "pooled CLIP embedding")


def build_lpips(cfg: TrainConfig, device: torch.device, random_trunk: bool) -> nn.Module:
    import lpips

    # The linear calibration layers ship in the lpips package; its VGG/AlexNet trunk comes from
    # torchvision's download unless the run is on a preset (offline: a random trunk).
    model = lpips.LPIPS(net=cfg.lpips_net, pretrained=True, pnet_rand=random_trunk, verbose=False)
    return model.to(device).eval().requires_grad_(False)
