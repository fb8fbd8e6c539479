"""The mini world's VAE: a diffusers ``AutoencoderKL`` trained to reconstruct world scenes.

Same class and block types as SD 2.1's VAE, three blocks instead of four: 64x64 images become
16x16x4 latents (downsampling by 4, not 8), because an 8x8 latent is too coarse to keep a concept's
pattern (stripes, dots, a two-tone split) that personalization must learn. The loss is SD's
reconstruction objective cut to what the quality bar measures: mean squared error (so PSNR) plus
SD's KL weight of 1e-6, which keeps the posterior a usable Gaussian. After training,
``scaling_factor`` is set to 1 / (standard deviation of the latents) over training images, as SD's
0.18215 was, so the diffusion models see latents of unit variance.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from opad.world.components import component
from opad.world.pool import Pool, to_model_range

BLOCKS = (32, 64, 64)
HPARAMS = dict(steps=3600, batch=16, lr=1e-3, warmup=100, kl=1e-6, checkpoint_every=200)


def make_vae() -> AutoencoderKL:
    n = len(BLOCKS)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=BLOCKS,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=1.0,  # set from the trained latents by finish()
    )


def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Decode of the posterior mean, as the pipelines use the VAE; same range as ``x``."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> float:
    """PSNR in dB (peak 255) of the VAE's reconstructions of ``images`` (N, H, W, 3) uint8, after
    rounding to 8 bits as a saved image is; over all pixels of all images."""
    vae.eval()
    device, dtype = vae.device, vae.dtype
    se, count = 0.0, 0
    for i in range(0, len(images), batch):
        x = to_model_range(images[i:i + batch])
        y = reconstruct(vae, x.to(device, dtype)).float().cpu()
        se += (_to_8bit(y) - _to_8bit(x)).pow(2).sum().item()
        count += x.numel()
    return 10 * math.log10(255**2 / (se / count))


def make_run(folder: Path, pool: Pool, device: torch.device, *, seed: int, progress: bool = True,
             hparams: dict | None = None) -> component.Run:
    h = {**HPARAMS, **(hparams or {})}
    torch.manual_seed(seed)
    vae = make_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=h["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    bf16 = component.bf16_fast(device)

    def step(i: int, g: torch.Generator) -> dict[str, float]:
        index = torch.randint(len(pool), (h["batch"],), generator=g)
        x = pool.batch(index).to(device)
        noise = torch.randn(x.shape[0], 4, *(s // 4 for s in x.shape[2:]), generator=g).to(device)
        with component.autocast(device, bf16):
            post = vae.encode(x).latent_dist
            y = vae.decode(post.mean + post.std * noise).sample  # the reparameterised sample, from g
        mse = (y.float() - x).pow(2).mean()
        # SD weighs the summed KL against the summed pixel loss; both per pixel value here
        kl = post.kl().mean() / x[0].numel()
        loss = mse + h["kl"] * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"mse": mse.item(), "kl": kl.item(), "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name="vae", folder=folder, model=vae, optimizer=optimizer, steps=h["steps"], seed=seed, progress=progress,
        lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h,
    )


@torch.no_grad()
def latent_std(vae: AutoencoderKL, pool: Pool, n: int = 1024, batch: int = 64) -> float:
    vae.eval()
    latents = []
    for i in range(0, min(n, len(pool)), batch):
        x = pool.batch(torch.arange(i, min(i + batch, n, len(pool)))).to(vae.device, vae.dtype)
        latents.append(vae.encode(x).latent_dist.mode().float().cpu())
    return torch.cat(latents).std().item()


def finish(vae: AutoencoderKL, pool: Pool, heldout: np.ndarray, out: Path) -> dict:
    """Set ``scaling_factor``, save fp16 weights as a diffusers folder ``out`` and measure them."""
    std = latent_std(vae, pool)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    fp32_psnr = psnr(vae, heldout)
    component.save_fp16(vae, out)
    shipped = AutoencoderKL.from_pretrained(out, torch_dtype=torch.float32).to(vae.device)
    return {"psnr_fp32_db": round(fp32_psnr, 2), "psnr_db": round(psnr(shipped, heldout), 2),
            "heldout_images": len(heldout), "latent_std": round(std, 4), "scaling_factor": vae.config.scaling_factor}
