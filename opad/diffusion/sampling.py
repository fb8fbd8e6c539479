"""Prompt encoding, latent decoding and the student's 1/2/4-step sampler on a ModelBundle."""

from __future__ import annotations

import torch
from torch import Tensor

from opad.diffusion.schedule import (
    ddim_sample,
    guided_prediction,
    leading_timesteps,
    trailing_timesteps,
    turbo_initial_latent,
    unet_prediction,
)
from opad.models.loading import ModelBundle
from opad.models.tokenizer import prompt_ids

STUDENT_STEPS = (1, 2, 4)


def encode_prompts(bundle: ModelBundle, prompts: list[str], text_encoder: torch.nn.Module | None = None) -> Tensor:
    """Text-encoder hidden states (B, 77, D), tokenized as diffusers' SD 2.x pipelines do."""
    ids = prompt_ids(bundle.tokenizer, prompts).to(bundle.device)
    return (text_encoder or bundle.text_encoder)(ids)[0]


def decode_latents(bundle: ModelBundle, z0: Tensor, *, clamp: bool = True) -> Tensor:
    """VAE decode to fp32 images (B, 3, H, W) on the [0, 1] scale.

    ``clamp=False`` keeps the raw decoder output, which overshoots [0, 1] on white backgrounds and
    highlights: losses need it, since a clamped pixel gets no gradient (the release also feeds its
    losses the raw output). Saved images, previews and training buffers are clamped.
    """
    image = bundle.vae.decode((z0 / bundle.vae.config.scaling_factor).to(bundle.vae.dtype)).sample.float()
    image = image / 2 + 0.5
    return image.clamp(0, 1) if clamp else image


def initial_noise(
    bundle: ModelBundle, batch: int, resolution: int, generator: torch.Generator | None
) -> Tensor:
    """Starting latents drawn like diffusers' ``randn_tensor`` (on the generator's device), in float32
    and then cast: torch 2.11 (the GPU image's) draws another stream for a half dtype than for float32
    (2.14 does not), so a seed would give other images in fp16/bf16 than in fp32 there."""
    f = bundle.vae_scale_factor
    if resolution % f:
        raise ValueError(f"resolution must be a multiple of {f}, got {resolution}")
    shape = (batch, bundle.student_unet.config.in_channels, resolution // f, resolution // f)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(bundle.device, bundle.dtype)


def student_denoise(bundle: ModelBundle, cond: Tensor, noise: Tensor, steps: int = 1) -> Tensor:
    """The student's x0 latents from pure noise at 1, 2 or 4 steps (differentiable; training uses 1)."""
    if steps not in STUDENT_STEPS:
        raise ValueError(f"steps must be one of {STUDENT_STEPS}, got {steps}")
    cfg = bundle.student_scheduler.config
    timesteps = trailing_timesteps(steps, cfg.num_train_timesteps)
    alphas_cumprod = bundle.student_scheduler.alphas_cumprod
    unet = bundle.student_unet
    return ddim_sample(
        lambda z, t: unet_prediction(unet, z, t, cond),
        turbo_initial_latent(noise, timesteps[0], alphas_cumprod),
        timesteps,
        alphas_cumprod,
        cfg.prediction_type,
    )


@torch.no_grad()
def sample_student(
    bundle: ModelBundle,
    prompts: list[str],
    *,
    steps: int = 1,
    generator: torch.Generator | None = None,
    resolution: int | None = None,
    text_encoder: torch.nn.Module | None = None,
) -> Tensor:
    """The student's images in [0, 1] at 1, 2 or 4 steps (SD-Turbo: trailing timesteps, no CFG).

    ``text_encoder`` replaces the bundle's (a student trained without the shared encoder).
    """
    if steps not in STUDENT_STEPS:
        raise ValueError(f"steps must be one of {STUDENT_STEPS}, got {steps}")
    cond = encode_prompts(bundle, prompts, text_encoder)
    noise = initial_noise(bundle, len(prompts), resolution or bundle.default_resolution, generator)
    return decode_latents(bundle, student_denoise(bundle, cond, noise, steps))


@torch.no_grad()
def sample_teacher(
    bundle: ModelBundle,
    prompts: list[str],
    *,
    steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    resolution: int | None = None,
) -> Tensor:
    """The teacher's images in [0, 1]: DDIM (leading spacing, ends at ᾱ_0) with CFG."""
    sched = bundle.teacher_scheduler
    cfg = sched.config
    cond = encode_prompts(bundle, prompts)
    uncond = encode_prompts(bundle, [""])
    z_T = initial_noise(bundle, len(prompts), resolution or bundle.default_resolution, generator)
    unet = bundle.teacher_unet
    final_alpha = 1.0 if cfg.set_alpha_to_one else sched.alphas_cumprod[0]
    z0 = ddim_sample(
        lambda z, t: guided_prediction(unet, z, t, cond, uncond, guidance_scale),
        z_T,
        leading_timesteps(steps, cfg.num_train_timesteps, cfg.steps_offset),
        sched.alphas_cumprod,
        cfg.prediction_type,
        final_alpha_cumprod=final_alpha,
    )
    return decode_latents(bundle, z0)
