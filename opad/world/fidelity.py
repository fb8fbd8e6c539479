"""How much a student's one-step samples look like a concept's photos, by the world's held-out
evaluation encoder (the DINO-score analogue: mean cosine of each sample's CLS feature to each photo's).
No training loss uses that encoder, so a trainer cannot raise this score by fitting its own critic."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from opad.models.loading import ModelBundle
from opad.sampling import sample_student
from opad.world import encoders
from opad.world.layout import SHIPPED

EVAL_ENCODER = SHIPPED / "eval_encoder"
# prompts that score a concept ("{}" is its token and class word): three recontextualizations and the plain one
FIDELITY_PROMPTS = ("a photo of a {} on the beach", "a photo of a {} in the snow", "a photo of a {} indoors",
                    "a photo of a {}")


@functools.lru_cache(maxsize=2)
def _encoder(folder: str) -> nn.Module:
    return encoders.load_vit(folder)


def read_photos(folder: str | Path) -> np.ndarray:
    """A concept folder's photos as (N, H, W, 3) uint8, in name order."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png"))])


@torch.no_grad()
def concept_similarity(bundle: ModelBundle, prompts: list[str], photos: np.ndarray, *, seeds: Iterable[int] = range(4),
                       text_encoder: nn.Module | None = None, encoder_dir: Path = EVAL_ENCODER) -> float:
    """Mean cosine between the held-out encoder's features of the student's 1-step samples (every
    prompt, every seed's noise) and of the photos."""
    vit = _encoder(str(encoder_dir))
    samples = [sample_student(bundle, prompts, steps=1, generator=torch.Generator().manual_seed(seed),
                              text_encoder=text_encoder) for seed in seeds]
    images = (torch.cat(samples).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return float((encoders.features(vit, images) @ encoders.features(vit, photos).t()).mean())
