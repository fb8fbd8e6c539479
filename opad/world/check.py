"""``python -m opad.world.check``: measure the mini world's models against their quality bars.

Each bar is measured on scenes of the held-out world (seed 1, never trained on), from the shipped
weights (or ``--weights DIR``, e.g. a build's ``OUT/weights``). Prints one line per bar and writes
the report as JSON with ``--out``; exits 1 when a bar is missed, 0 when all are met. A component not
built yet is reported as such, not as a failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from torchvision.transforms.functional import to_pil_image
from transformers import CLIPModel

from opad.errors import OpadError, command_main
from opad.models.quiet import no_transformers_bars
from opad.world.components import encoders
from opad.world.components import vae as world_vae
from opad.world.components.classifier import WorldClassifier, accuracy
from opad.world.components.clip import zero_shot_accuracy
from opad.world.layout import HELDOUT_WORLD, SHIPPED
from opad.world.pool import Pool, pool_scenes
from opad.world.preset import student_pipeline, teacher_pipeline
from opad.world.render.contexts import CONTEXTS
from opad.world.render.objects import CLASSES
from opad.world.render.scenes import COLOURS, Scene, caption, grid, render, world_scenes

VAE_PSNR_DB = 26.0
TEACHER_ACCURACY = 0.8  # of the prompted class, and of the prompted context, at 25 DDIM steps with CFG
TEACHER_STEPS, TEACHER_GUIDANCE = 25, 7.5
STUDENT_ACCURACY = 0.7  # the same, for 1-step samples of the student
CLASSIFIER_ACCURACY = 0.95  # the judge must itself be right on real scenes before it judges samples
CLIP_ACCURACY = 0.9  # the towers pick a held-out scene's caption over its class (context) swapped ones
ENCODER_INSTANCE = 0.8  # an instance's two photos more alike than it and another instance of its class
ENCODER_KNN = 0.7  # the features carry the class: k-nearest-neighbour accuracy among held-out scenes
INSTANCES = 256  # held-out instances photographed twice for the encoders' instance ranking
KNN_SCENES = 512  # held-out scenes the encoders' kNN runs on, whatever --images says: with k = 20 among
# 8 classes, far fewer scenes leave too few of each class to be a scene's neighbours


@dataclass
class Bar:
    component: str
    measure: str
    value: float | None  # None: the component is not built
    bar: float
    detail: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value >= self.bar

    def line(self) -> str:
        if self.value is None:
            return f"{self.component:12s} {self.measure:38s} not built yet"
        verdict = "ok" if self.met else "MISSED"
        show = (lambda v: f"{v:.1%}") if self.bar <= 1 else (lambda v: f"{v:.2f}")  # fractions as percentages
        value = f"{show(self.value):>7s} (bar {show(self.bar)})"
        return f"{self.component:12s} {self.measure:38s} {value}  {verdict}  {self.detail}"


def heldout_images(n: int, size: int = 64) -> np.ndarray:
    """The first ``n`` scenes of the held-out world as (n, size, size, 3) uint8."""
    return np.stack([np.asarray(render(s, size)) for s in world_scenes(n, HELDOUT_WORLD)])


def check_vae(weights: Path, images: np.ndarray) -> Bar:
    folder = weights / "vae"
    if not (folder / "config.json").is_file():
        return Bar("vae", "reconstruction PSNR, dB", None, VAE_PSNR_DB)
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    value = world_vae.psnr(vae, images)
    return Bar("vae", "reconstruction PSNR, dB", round(value, 2), VAE_PSNR_DB, f"{len(images)} held-out scenes")


def class_context_prompts(per_pair: int = 2) -> list[tuple[str, str, str]]:
    """(prompt, class, context) for every class in every context, ``per_pair`` times, the colour cycling
    through :data:`COLOURS`; worded as the training captions are."""
    colours = list(COLOURS)
    out = []
    for k in range(per_pair):
        for i, category in enumerate(CLASSES):
            for j, context in enumerate(CONTEXTS):
                colour = colours[(i + j + k * 3) % len(colours)]
                out.append((caption(Scene(category=category, context=context, colour=colour)), category, context))
    return out


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, prompts: list[str], steps: int, guidance: float, seed: int = 0,
           batch: int = 48) -> torch.Tensor:
    """A pipeline's images (N, 3, 64, 64) in [0, 1], seeded per batch."""
    images = []
    pipe.set_progress_bar_config(disable=True)
    for i in range(0, len(prompts), batch):
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   height=64, width=64, generator=torch.Generator().manual_seed(seed + i), output_type="pt")
        images.append(out.images.float().cpu())
    return torch.cat(images)


def prompted_accuracy(classifier: WorldClassifier, images: torch.Tensor, expected: list[tuple[str, str, str]]
                      ) -> dict[str, float]:
    """Fraction of images the classifier names with the prompted class, and with the prompted context."""
    got = classifier.predict(images)
    return {"category": float(np.mean([g == e[1] for g, e in zip(got["category"], expected)])),
            "context": float(np.mean([g == e[2] for g, e in zip(got["context"], expected)]))}


@dataclass(frozen=True)
class Sampler:
    """How a diffusion component is sampled for its bar."""

    component: str
    pipeline: Callable[..., StableDiffusionPipeline]  # (weights, unet_dir=...) -> pipeline
    steps: int
    guidance: float
    bar: float
    what: str  # "25-step CFG", "1-step"


TEACHER = Sampler("teacher", lambda w, d: teacher_pipeline(w, teacher_dir=d), TEACHER_STEPS, TEACHER_GUIDANCE,
                  TEACHER_ACCURACY, "25-step CFG")
# SD-Turbo samples without guidance (guidance_scale 0 skips the unconditional branch)
STUDENT = Sampler("student", lambda w, d: student_pipeline(w, student_dir=d), 1, 0.0, STUDENT_ACCURACY, "1-step")


def check_sampled(s: Sampler, weights: Path, per_pair: int = 2, grid_png: Path | None = None,
                  samples: int | None = None, unet_dir: Path | None = None) -> list[Bar]:
    """The prompted-class and prompted-context accuracy of a component's samples (the first
    ``samples`` of :func:`class_context_prompts`, all by default), judged by ``weights/classifier``."""
    names = (s.component, f"class of {s.what} samples"), (s.component, f"context of {s.what} samples")
    unet_dir = unet_dir or weights / s.component
    classifier_dir = weights / "classifier"
    needed = (weights / "vae", weights / "clip", unet_dir, classifier_dir)
    if not all((p / "config.json").is_file() for p in needed):
        return [Bar(c, m, None, s.bar) for c, m in names]
    expected = class_context_prompts(per_pair)[:samples]
    images = sample(s.pipeline(weights, unet_dir), [e[0] for e in expected], s.steps, s.guidance)
    if grid_png is not None:
        grid([to_pil_image(x) for x in images[:len(CLASSES) * len(CONTEXTS)]], columns=len(CONTEXTS)).save(grid_png)
    acc = prompted_accuracy(WorldClassifier.load(classifier_dir), images, expected)
    detail = f"{len(images)} samples, {len(CLASSES)} classes x {len(CONTEXTS)} contexts"
    return [Bar(c, m, round(acc[k], 3), s.bar, detail) for (c, m), k in zip(names, ("category", "context"))]


def check_classifier(classifier_dir: Path, images: np.ndarray, scenes: list[Scene]) -> list[Bar]:
    if not (classifier_dir / "config.json").is_file():
        return [Bar("judge", "held-out class accuracy", None, CLASSIFIER_ACCURACY)]
    acc = accuracy(WorldClassifier.load(classifier_dir), images, scenes)
    return [Bar("judge", f"held-out {k} accuracy", round(acc[k], 3), CLASSIFIER_ACCURACY, f"{len(images)} scenes")
            for k in ("category", "context")]


def check_clip(clip_dir: Path, images: np.ndarray, scenes: list[Scene]) -> list[Bar]:
    if not (clip_dir / "config.json").is_file():
        return [Bar("clip", "held-out caption vs category-swapped", None, CLIP_ACCURACY)]
    with no_transformers_bars():
        model = CLIPModel.from_pretrained(clip_dir, torch_dtype=torch.float32)
    acc = zero_shot_accuracy(model, Pool(images, [caption(s) for s in scenes], scenes))
    return [Bar("clip", f"held-out caption vs {k}-swapped", round(acc[k], 3), CLIP_ACCURACY, f"{len(images)} scenes")
            for k in ("category", "context")]


@functools.lru_cache(maxsize=2)  # the same photos for every encoder of one check
def instance_photos(n: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two photos of each of the first ``n`` held-out scenes' objects: the scene itself, and the same
    object re-posed in another context; (first, second) as (n, size, size, 3) uint8, and the classes."""
    second = np.stack([np.asarray(render(s, size)) for s in pool_scenes(n, HELDOUT_WORLD, reposed=True)])
    return _cached_heldout_images(n, size), second, [s.category for s in world_scenes(n, HELDOUT_WORLD)]


@functools.lru_cache(maxsize=2)  # one rendering for every encoder of one check
def _cached_heldout_images(n: int, size: int = 64) -> np.ndarray:
    return heldout_images(n, size)


def check_encoder(kind: str, folder: Path) -> list[Bar]:
    """A world ViT encoder: instance ranking on re-posed instances, and kNN class accuracy among
    :data:`KNN_SCENES` held-out scenes."""
    if not (folder / "config.json").is_file():
        return [Bar(kind, "held-out instance ranking", None, ENCODER_INSTANCE)]
    vit = encoders.load_vit(folder)
    first, second, classes = instance_photos(INSTANCES)
    ranking = encoders.instance_ranking(encoders.features(vit, first), encoders.features(vit, second), classes)
    images = _cached_heldout_images(KNN_SCENES)
    knn = encoders.knn_accuracy(encoders.features(vit, images), [s.category for s in world_scenes(len(images),
                                                                                                  HELDOUT_WORLD)])
    return [Bar(kind, "held-out instance ranking", round(ranking, 3), ENCODER_INSTANCE,
                f"{len(classes)} objects, each re-posed in another context, vs others of its class"),
            Bar(kind, "held-out kNN class accuracy", round(knn, 3), ENCODER_KNN, f"{len(images)} scenes, k=20")]


def check(weights: str | Path = SHIPPED, n_images: int = 512, per_pair: int = 2, grids: Path | None = None
          ) -> list[Bar]:
    weights = Path(weights)
    if not weights.is_dir():
        raise OpadError(f"--weights {str(weights)!r} is not a folder")
    if grids is not None:
        grids.mkdir(parents=True, exist_ok=True)
    images, scenes = heldout_images(n_images), world_scenes(n_images, HELDOUT_WORLD)
    return [check_vae(weights, images), *check_classifier(weights / "classifier", images, scenes),
            *check_clip(weights / "clip", images, scenes),
            *[bar for kind in encoders.KINDS for bar in check_encoder(kind, weights / kind)],
            *[bar for s in (TEACHER, STUDENT)
              for bar in check_sampled(s, weights, per_pair, grids and grids / f"{s.component}.png")]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opad.world.check",
        description="Measure the mini world's models against their quality bars on held-out scenes "
        f"(world seed {HELDOUT_WORLD}): VAE reconstruction PSNR >= {VAE_PSNR_DB:g} dB; the judge (the world "
        f"classifier) right on >= {CLASSIFIER_ACCURACY:.0%} of real scenes; the clip towers preferring a scene's "
        f"caption to its class- and context-swapped versions >= {CLIP_ACCURACY:.0%} of the time; each self-supervised "
        f"encoder (dino_v1, dino_v2, eval_encoder) ranking an object's re-posed photo above other objects of its "
        f"class >= {ENCODER_INSTANCE:.0%} of the time, with kNN class accuracy >= {ENCODER_KNN:.0%}; teacher samples "
        f"({TEACHER_STEPS} DDIM "
        f"steps, CFG {TEACHER_GUIDANCE:g}) showing the prompted class and the prompted context >= "
        f"{TEACHER_ACCURACY:.0%} of the time, and 1-step student samples >= {STUDENT_ACCURACY:.0%}. Exits 1 if a "
        "built component misses its bar, 2 on bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--weights", default=str(SHIPPED), help="folder with one subfolder per component")
    p.add_argument("--images", type=int, default=512, help="held-out scenes to measure on")
    p.add_argument("--per-pair", type=int, default=2, help="teacher samples per (class, context) pair")
    p.add_argument("--grids", default=None, metavar="DIR",
                   help="also save the teacher's and the student's samples, one per pair, as DIR/teacher.png and "
                   "DIR/student.png")
    p.add_argument("--out", default=None, help="also write the report to this JSON file")
    return p


@command_main()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--images", args.images), ("--per-pair", args.per_pair)):
        if value < 1:
            raise OpadError(f"{flag} must be at least 1, got {value}")
    bars = check(args.weights, args.images, args.per_pair, Path(args.grids) if args.grids else None)
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(b) | {"met": b.met} for b in bars], indent=2) + "\n")
    for b in bars:
        print(b.line())
    return 1 if any(b.met is False for b in bars) else 0


if __name__ == "__main__":
    sys.exit(main())
