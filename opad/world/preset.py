"""The mini world's models as diffusers pipelines, assembled from the shipped component folders.

The tokenizer is SD 2.x's, built offline (:func:`opad.models.tokenizer.build_sd2_tokenizer`), and the
schedulers are the tiny preset's SD 2.1 / SD-Turbo ones, so neither is stored with the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from opad.cache import cache_root, cached_folder
from opad.diffusion.schedulers import student_scheduler, teacher_scheduler
from opad.fsutil import file_hash
from opad.models.quiet import no_transformers_bars
from opad.models.tokenizer import build_sd2_tokenizer
from opad.world.components.clip import load_text_encoder
from opad.world.layout import SHIPPED, SUMMARY


def _pipeline(weights: Path, unet_dir: Path, scheduler, dtype: torch.dtype) -> StableDiffusionPipeline:
    weights = Path(weights)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(weights / "vae", torch_dtype=dtype),
        text_encoder=load_text_encoder(weights / "clip", dtype),
        tokenizer=build_sd2_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def teacher_pipeline(weights: Path, dtype: torch.dtype = torch.float32, *, teacher_dir: Path | None = None
                     ) -> StableDiffusionPipeline:
    """SD 2.1-shaped, from a weights folder: its ``vae``, the text tower of its ``clip`` and its
    ``teacher`` UNet (or ``teacher_dir``), DDIM v-prediction."""
    return _pipeline(weights, teacher_dir or Path(weights) / "teacher", teacher_scheduler(), dtype)


def student_pipeline(weights: Path, dtype: torch.dtype = torch.float32, *, student_dir: Path | None = None
                     ) -> StableDiffusionPipeline:
    """SD-Turbo-shaped, from a weights folder: its ``vae``, its ``clip`` text tower (shared with the
    teacher, as SD-Turbo shares SD 2.1's) and its ``student`` UNet, Euler with trailing spacing."""
    return _pipeline(weights, student_dir or Path(weights) / "student", student_scheduler(), dtype)


def _shipped_version() -> str:
    """Names the shipped weights: the cached pipelines are rebuilt when ``build.json`` changes."""
    return "world-" + file_hash(SHIPPED / SUMMARY)[:12]


def write_world_preset(out_dir: Path, weights: Path = SHIPPED) -> None:
    """``out_dir/teacher`` and ``out_dir/student``: the world's models as complete diffusers
    ``StableDiffusionPipeline`` folders, which every ``--teacher`` / ``--student`` argument takes."""
    for name, pipe in (("teacher", teacher_pipeline(weights)), ("student", student_pipeline(weights))):
        with no_transformers_bars():
            pipe.save_pretrained(out_dir / name, safe_serialization=True)


def world_preset_dir() -> Path:
    """The shipped world as teacher and student pipeline folders in the cache, written on first use."""
    return cached_folder(cache_root() / _shipped_version(), write_world_preset)
