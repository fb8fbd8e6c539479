"""How much a student's one-step samples look like a concept's photos, by the world's held-out
evaluation encoder (the DINO-score analogue: mean cosine of each sample's CLS feature to each photo's).
No training loss uses that encoder, so a trainer cannot raise this score by fitting its own critic.

And what the world's classifier (the quality bars' judge, also in no loss) sees in generated images:
how often it names the concept's class, and the context a prompt asks for. The encoders' similarity
rewards the concept's colours and texture even without the object (benchmarks/studies/world_metric_sanity.py);
the classifier looks for the object's shape."""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from opad.diffusion.sampling import sample_student
from opad.models.loading import ModelBundle
from opad.world.components import encoders
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
    return read_photos_named(Path(folder), [p.name for p in sorted(Path(folder).glob("*.png"))])


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


CLASSIFIER = SHIPPED / "classifier"


def prompt_context(prompt: str) -> str | None:
    """The world context a prompt names by its caption phrase ("on the beach"), or None."""
    from opad.world.render.contexts import CONTEXTS

    return next((name for name, spec in CONTEXTS.items() if spec.phrase in prompt), None)


@torch.no_grad()
def classifier_scores(folder: Path, class_word: str) -> dict[str, float]:
    """``class_acc``: the share of the images in ``folder`` (its ``manifest.csv``: file, prompt) that the
    world classifier labels ``class_word``; ``context_acc``: of those whose prompt names a context, the
    share labelled with it (NaN when none does)."""
    with (folder / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    images = read_photos_named(folder, [r["file"] for r in rows])
    predicted = _classifier(str(CLASSIFIER)).predict(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    named = [(prompt_context(r["prompt"]), p) for r, p in zip(rows, predicted["context"])]
    named = [(want, got) for want, got in named if want is not None]
    return {"class_acc": float(np.mean([c == class_word for c in predicted["category"]])),
            "context_acc": float(np.mean([want == got for want, got in named])) if named else float("nan")}


@functools.lru_cache(maxsize=1)
def _classifier(folder: str) -> nn.Module:
    from opad.world.components.classifier import WorldClassifier

    return WorldClassifier.load(Path(folder))


def read_photos_named(folder: Path, names: list[str]) -> np.ndarray:
    """The named images of ``folder`` as (N, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names])

