"""Small-run helpers shared by the trainer tests."""

from __future__ import annotations

import dataclasses

import torch

from opad.concept.folder import kv_parameters
from opad.config import TrainConfig

FAST = dict(max_steps=4, batch_size=2, preview_every=2, checkpoint_every=2, preview_teacher_steps=2,
            swd_projections=16, collab_start=None)


def write_class_images(folder, n: int = 2) -> str:
    """``n`` random 70-px photos (a class-prior folder); returns the folder."""
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(70, 70, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i}.png")
    return str(folder)


def make_cfg(out_dir, **overrides) -> TrainConfig:
    return TrainConfig(output_dir=str(out_dir), **{**FAST, **overrides})


def make_trainer(out_dir, **overrides):
    from opad.train.loop import build_trainer

    return build_trainer(make_cfg(out_dir, **overrides), progress=False)


def snapshot(trainer) -> dict[str, torch.Tensor]:
    """Every tensor a step could change, by name."""
    b = trainer.bundle
    state = {}
    for prefix, module in (("teacher_unet", b.teacher_unet), ("student_unet", b.student_unet),
                           ("text_encoder", b.text_encoder), ("heads", trainer.method.heads)):
        for name, p in module.state_dict().items():
            state[f"{prefix}.{name}"] = p.detach().clone()
    state["teacher_tokens"] = trainer.method.teacher_tokens.rows.detach().clone()
    return state


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def kv_names(unet_prefix: str, unet) -> set[str]:
    names = {n for n, p in unet.named_parameters() if any(p is q for q in kv_parameters(unet))}
    return {f"{unet_prefix}.{n}" for n in names}


def first_losses(trainer) -> dict[str, float]:
    out = trainer.iteration()
    return {k: v for k, v in out.values.items() if k.startswith("loss/") and k != "loss/student"}


def same_cfg(cfg: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
