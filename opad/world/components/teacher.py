"""The mini world's teacher: an SD 2.1-shaped UNet on the world's frozen text encoder.

As SD 2.1 conditions on OpenCLIP's frozen text tower, the teacher conditions on the world CLIP's
(:mod:`opad.world.components.clip`), which contrastive training has taught to tell classes, colours and
contexts apart. (A first version trained its own text encoder jointly on the denoising loss: it
learnt colours and contexts but not classes, whose silhouettes change few pixels, and drew
colour-right blobs; 23% of samples showed the prompted class after 2,500 steps.) The UNet keeps SD
2.1's block classes, linear projections, upcast attention and v-prediction on SD's beta schedule
(DDIM at sampling), at 3 blocks for the 16x16 latents. Captions are replaced by the empty prompt
10% of the time so classifier-free guidance works. Two choices make a short CPU run go further:
Min-SNR-5 loss weighting (Hang et al., 2023), and shipping an EMA of the weights (decay 0.999).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from opad.diffusion.schedulers import teacher_scheduler
from opad.fsutil import file_hash
from opad.models.tokenizer import build_sd2_tokenizer, prompt_ids
from opad.world.components import clip, component
from opad.world.pool import Pool

BLOCKS = (32, 64, 64)
HPARAMS = dict(steps=5000, batch=64, lr=1e-3, warmup=200, cfg_dropout=0.1, min_snr=5.0, ema=0.999,
               checkpoint_every=100, check_samples=None)  # None: measure on every check prompt


def make_unet(*, upcast_attention: bool = True) -> UNet2DConditionModel:
    """SD 2.1's UNet structure at world size (the student, SD-Turbo-shaped, has upcast off)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=BLOCKS, layers_per_block=1, attention_head_dim=(2, 4, 4),
        cross_attention_dim=clip.TEXT_WIDTH, norm_num_groups=16, use_linear_projection=True,
        upcast_attention=upcast_attention,
    )


@torch.no_grad()
def encode_pool(vae_dir: Path, pool: Pool, cache: Path, batch: int = 128) -> torch.Tensor:
    """Scaled posterior-mean latents (N, 4, 16, 16) of the pool, cached per VAE weights file."""
    weights = next(Path(vae_dir).glob("*.safetensors"))
    path = Path(cache) / f"latents-{file_hash(weights)[:12]}-{len(pool)}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.float32))
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    chunks = [vae.encode(pool.batch(torch.arange(i, min(i + batch, len(pool))))).latent_dist.mode()
              for i in range(0, len(pool), batch)]
    latents = torch.cat(chunks) * vae.config.scaling_factor
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, latents.half().numpy())
    tmp.replace(path)
    return latents.half().float()  # what a later resume reads back


@torch.no_grad()
def caption_embeddings(clip_dir: Path, captions: list[str], device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen text encoder's hidden states (K, 77, D) of the K distinct captions, which of them
    each caption is (N,), and the empty prompt's (1, 77, D): computed once, as the encoder is frozen."""
    distinct = list(dict.fromkeys(captions))
    which = {c: k for k, c in enumerate(distinct)}
    encoder = clip.load_text_encoder(clip_dir).to(device).eval()
    tok = build_sd2_tokenizer()
    states = torch.cat([encoder(prompt_ids(tok, distinct[i:i + 256]).to(device))[0]
                        for i in range(0, len(distinct), 256)])
    return states, torch.tensor([which[c] for c in captions]), encoder(prompt_ids(tok, [""]).to(device))[0]


def make_run(folder: Path, pool: Pool, device: torch.device, *, seed: int, vae_dir: Path, clip_dir: Path,
             progress: bool = True, hparams: dict | None = None) -> component.Run:
    h = {**HPARAMS, **(hparams or {})}
    latents = encode_pool(vae_dir, pool, Path(folder))
    states, which, empty = caption_embeddings(clip_dir, pool.captions, device)
    torch.manual_seed(seed)
    live = make_unet()
    # The classic attention processor trains a third faster on CPUs than SDPA's backward at these
    # sizes; the shipped config is unaffected (processors are not saved).
    live.set_attn_processor(AttnProcessor())
    ema = copy.deepcopy(live).requires_grad_(False)
    model = torch.nn.ModuleDict({"live": live, "ema": ema}).to(device)
    optimizer = torch.optim.AdamW(live.parameters(), lr=h["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    alphas = teacher_scheduler().alphas_cumprod.to(device)
    bf16 = component.bf16_fast(device)

    def step(i: int, g: torch.Generator) -> dict[str, float]:
        b = h["batch"]
        index = torch.randint(len(pool), (b,), generator=g)
        x0 = latents[index].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, len(alphas), (b,), generator=g).to(device)
        drop = (torch.rand(b, generator=g) < h["cfg_dropout"]).to(device)
        cond = torch.where(drop[:, None, None], empty, states[which[index].to(device)])
        a = alphas[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        with component.autocast(device, bf16):
            pred = live(z, t, cond).sample
        snr = alphas[t] / (1 - alphas[t])
        # Min-SNR-gamma for a v-prediction target; None: the plain v loss
        weight = snr.clamp(max=h["min_snr"]) / (snr + 1) if h["min_snr"] else torch.ones_like(snr)
        per_sample = (pred.float() - v).pow(2).mean((1, 2, 3))
        loss = (weight * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live.parameters(), 1.0)
        optimizer.step()
        component.ema_update(ema, live, i, h["ema"])
        return {"loss": loss.item(), "v_mse": per_sample.mean().item(), "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name="teacher", folder=folder, model=model, optimizer=optimizer, steps=h["steps"], seed=seed,
        progress=progress, lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h,
    )
