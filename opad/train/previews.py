"""Preview grids: the student's one-step image beside the teacher's multi-step image, per prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from opad.config import TrainConfig
from opad.diffusion.sampling import sample_student, sample_teacher
from opad.generate import to_pil
from opad.models.loading import ModelBundle, teacher_view

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


def preview_prompts(cfg: TrainConfig, subject: str) -> list[str]:
    """The preview prompts, ``{}`` replaced by the token + class (other braces are the user's text)."""
    templates = cfg.preview_prompts or ["a photo of a {}", "a {} on the beach"]
    return [t.replace("{}", subject) for t in templates]


@torch.no_grad()
def write_preview(out_dir: Path, step: int, *, cfg: TrainConfig, bundle: ModelBundle, prompts: list[str],
                  resolution: int, text_encoder: nn.Module) -> Path:
    """``out_dir/samples/step-NNNNNN.png``: per prompt, the student's one-step image (``text_encoder``
    encodes its prompts) beside the teacher's multi-step image; fixed seeds (one per prompt), so grids
    compare across steps."""
    rows = []
    finetuned_teacher = cfg.finetune == "teacher"  # a baseline trained the teacher: sample it as one
    teacher_bundle = teacher_view(bundle) if finetuned_teacher else bundle
    for i, prompt in enumerate(prompts):
        row = []
        if not finetuned_teacher:
            row += to_pil(sample_student(bundle, [prompt], steps=1, generator=torch.Generator().manual_seed(i),
                                         resolution=resolution, text_encoder=text_encoder))
        if cfg.use_teacher or finetuned_teacher:
            row += to_pil(sample_teacher(teacher_bundle, [prompt], steps=cfg.preview_teacher_steps,
                                         guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(i),
                                         resolution=resolution))
        rows.append([_enlarge(im) for im in row])
    labels = ([] if finetuned_teacher else ["student"]) + \
        ([f"teacher {cfg.preview_teacher_steps}"] if cfg.use_teacher or finetuned_teacher else [])
    path = Path(out_dir) / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, labels).save(path)
    return path
