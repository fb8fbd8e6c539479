"""The mini world's models as diffusers pipelines, assembled from the shipped component folders.

The tokenizer is SD 2.x's, built offline (:func:`opad.models.tokenizer.build_sd2_tokenizer`), and the
schedulers are the tiny preset's SD 2.1 / SD-Turbo ones, so neither is stored with the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from opad.models.tokenizer import build_sd2_tokenizer
from opad.tiny import teacher_scheduler


def teacher_pipeline(vae_dir: Path, teacher_dir: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """SD 2.1-shaped: the world VAE, ``teacher_dir/text_encoder`` and ``teacher_dir/unet``, DDIM v-prediction."""
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(Path(teacher_dir) / "text_encoder", torch_dtype=dtype),
        tokenizer=build_sd2_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(Path(teacher_dir) / "unet", torch_dtype=dtype),
        scheduler=teacher_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
