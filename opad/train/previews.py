"""Preview grids: the student's one-step image beside the teacher's multi-step image, per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from opad.diffusion.sampling import sample_student, sample_teacher
from opad.generate import to_pil
from opad.models.loading import teacher_view

if TYPE_CHECKING:
    from opad.train.loop import Trainer

_HEADER = 14
_MIN_SIDE = 128  # smaller images (the mini world's 64 px) are shown enlarged, pixel for pixel


def _enlarge(image: Image.Image) -> Image.Image:
    factor = -(-_MIN_SIDE // image.width)
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def grid(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Images in a table under a one-line header of column labels."""
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * len(rows[0]), _HEADER + h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(labels):
        draw.text((c * w + 2, 1), label, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            out.paste(img, (c * w, _HEADER + r * h))
    return out


@torch.no_grad()
def write_preview(trainer: "Trainer", step: int) -> Path:
    """``samples/step-NNNNNN.png``; fixed seeds (one per prompt), so grids compare across steps."""
    cfg, bundle = trainer.cfg, trainer.bundle
    rows = []
    encoder = trainer.method.student_text_encoder
    finetuned_teacher = cfg.finetune == "teacher"  # a baseline trained the teacher: sample it as one
    teacher_bundle = teacher_view(bundle) if finetuned_teacher else bundle
    for i, prompt in enumerate(trainer.preview_prompts()):
        row = []
        if not finetuned_teacher:
            row += to_pil(sample_student(bundle, [prompt], steps=1, generator=torch.Generator().manual_seed(i),
                                         resolution=trainer.resolution, text_encoder=encoder))
        if cfg.use_teacher or finetuned_teacher:
            row += to_pil(sample_teacher(teacher_bundle, [prompt], steps=cfg.preview_teacher_steps,
                                         guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(i),
                                         resolution=trainer.resolution))
        rows.append([_enlarge(im) for im in row])
    labels = ([] if finetuned_teacher else ["student"]) + \
        ([f"teacher {cfg.preview_teacher_steps}"] if cfg.use_teacher or finetuned_teacher else [])
    path = trainer.out / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, labels).save(path)
    return path
