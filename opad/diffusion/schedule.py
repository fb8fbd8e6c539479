"""Diffusion math as small pure functions over a schedule's ``alphas_cumprod`` (ᾱ).

Everything works in the variance-preserving latent space z_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε that the
UNets see. Timesteps are integer tensors, one per batch item where a function takes a batch.

Precision: UNet outputs are upcast to fp32 before any combination (guidance, x0, v/ε) and the
sampler's latents stay fp32; only the UNet's own input is cast to its weights' dtype. Under bf16
the guidance amplifies the output error 7.5x and the student's x0 divides ε̂ by √ᾱ_999 ≈ 0.068,
so rounding those combinations to bf16 as well would add error on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

PredictionType = str  # "epsilon" or "v_prediction", as in diffusers' scheduler configs


def _at(alphas_cumprod: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """ᾱ_t gathered per batch item and shaped to broadcast against ``like``."""
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    a = alphas_cumprod[t].to(device=like.device, dtype=like.dtype)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def c_weight(t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """The alignment weight c(t) = ᾱ_t (per sample): trust the teacher more at low noise."""
    return alphas_cumprod[torch.as_tensor(t, device=alphas_cumprod.device)]


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """z_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
    a = _at(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: Tensor, noise: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
    a = _at(alphas_cumprod, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_eps(z_t: Tensor, eps: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """x0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    a = _at(alphas_cumprod, t, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_from_v(z_t: Tensor, v: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """x0 = √ᾱ_t·z_t − √(1−ᾱ_t)·v."""
    a = _at(alphas_cumprod, t, z_t)
    return a.sqrt() * z_t - (1 - a).sqrt() * v


def eps_from_v(z_t: Tensor, v: Tensor, t: Tensor | int, alphas_cumprod: Tensor) -> Tensor:
    """ε = √(1−ᾱ_t)·z_t + √ᾱ_t·v."""
    a = _at(alphas_cumprod, t, z_t)
    return (1 - a).sqrt() * z_t + a.sqrt() * v


def split_prediction(
    pred: Tensor, z_t: Tensor, t: Tensor | int, alphas_cumprod: Tensor, prediction_type: PredictionType
) -> tuple[Tensor, Tensor]:
    """(x0, ε) in fp32 from a UNet output of either prediction type."""
    pred, z_t = pred.float(), z_t.float()
    if prediction_type == "epsilon":
        return x0_from_eps(z_t, pred, t, alphas_cumprod), pred
    if prediction_type == "v_prediction":
        return x0_from_v(z_t, pred, t, alphas_cumprod), eps_from_v(z_t, pred, t, alphas_cumprod)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (expected 'epsilon' or 'v_prediction')")


def turbo_initial_latent(noise: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """The student's first UNet input: √(1−ᾱ_t)·ε, not ε.

    diffusers' Euler scheduler with trailing (or linspace) spacing starts from σ_max·ε and scales
    it by 1/√(σ_max²+1) before the UNet, so SD-Turbo has always been run on this slightly shrunk
    noise; training and sampling use it alike.
    """
    return noise.float() * (1 - alphas_cumprod[t]).sqrt().to(device=noise.device, dtype=torch.float32)


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """SD-Turbo's timesteps: trailing spacing, so one step is t = 999 and 4 steps 999/749/499/249."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return [round(num_train_timesteps - i * ratio) - 1 for i in range(num_steps)]


def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """SD 2.1's DDIM timesteps: leading spacing plus the scheduler's steps_offset."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return [i * ratio + steps_offset for i in reversed(range(num_steps))]


def ddim_sample(
    model: Callable[[Tensor, Tensor], Tensor],
    z_T: Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    prediction_type: PredictionType,
    final_alpha_cumprod: float | Tensor = 1.0,
) -> Tensor:
    """Deterministic DDIM from pure noise ``z_T``; returns the last latent (fp32).

    ``model(z_t, t)`` returns the UNet prediction (it casts ``z_t`` to its UNet's dtype). Each step predicts (x0, ε) and re-noises x0
    with that ε to the next timestep. With ``final_alpha_cumprod`` = 1 the last latent is x0,
    which makes this exactly Euler with σ → 0 (SD-Turbo's scheduler); SD 2.1's DDIM ends at ᾱ_0.
    """
    z = z_T.float()
    for i, t in enumerate(timesteps):
        t_batch = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        x0, eps = split_prediction(model(z, t_batch), z, t, alphas_cumprod, prediction_type)
        a_next = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else final_alpha_cumprod
        a_next = torch.as_tensor(a_next, dtype=torch.float32, device=z.device)
        z = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return z


def unet_prediction(unet: torch.nn.Module, z_t: Tensor, t: Tensor, cond: Tensor,
                    dtype: torch.dtype | None = None) -> Tensor:
    """One UNet call: inputs cast to the UNet's dtype (``dtype`` when the caller knows it: reading a
    diffusers model's ``dtype`` walks all its modules, which torch.compile traces every time), the
    prediction returned in fp32."""
    dtype = dtype or getattr(unet, "dtype", z_t.dtype)  # diffusers models know their weights' dtype
    return unet(z_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()


def guided_prediction(
    unet: torch.nn.Module,
    z_t: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guidance u + s·(c − u) in fp32, with both branches in one batched UNet call."""
    if guidance_scale == 1.0:
        return unet_prediction(unet, z_t, t, cond)
    uncond = uncond.expand_as(cond)
    pred = unet_prediction(unet, torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
    pred_uncond, pred_cond = pred.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def teacher_x0(
    unet: torch.nn.Module,
    z_t: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: PredictionType,
    guidance_scale: float = 7.5,
) -> Tensor:
    """The teacher's x0 prediction at per-sample timesteps ``t`` with classifier-free guidance."""
    pred = guided_prediction(unet, z_t, t, cond, uncond, guidance_scale)
    return split_prediction(pred, z_t, t, alphas_cumprod, prediction_type)[0]
