"""The mini world's teacher: a text encoder and an SD 2.1-shaped UNet, trained together from scratch.

SD 2.1 pairs its UNet with a CLIP text encoder trained elsewhere; no such encoder exists for the
world, so the ``CLIPTextModel`` (SD 2.x's tokenizer and config structure, width 32) learns with the
UNet on the denoising loss. The UNet keeps SD 2.1's block classes, linear projections, upcast
attention and v-prediction on SD's beta schedule (DDIM at sampling), at 3 blocks for the 16x16
latents. Captions are replaced by the empty prompt 10% of the time so classifier-free guidance
works. Two choices make a short CPU run go further: Min-SNR-5 loss weighting (Hang et al., 2023,
which converges several times faster than uniform weighting), and shipping an EMA of the weights
(decay 0.999), which samples far better than the last iterate of a short run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from opad.fsutil import file_hash
from opad.models.tokenizer import MAX_LENGTH, VOCAB_SIZE, build_sd2_tokenizer, prompt_ids
from opad.tiny import teacher_scheduler
from opad.world import component
from opad.world.pool import Pool

TEXT_WIDTH = 32
BLOCKS = (32, 64, 64)
HPARAMS = dict(steps=5000, batch=32, lr=5e-4, warmup=100, cfg_dropout=0.1, min_snr=5.0, ema=0.999,
               checkpoint_every=100, check_samples=None)  # None: measure on every check prompt


def make_text_encoder() -> CLIPTextModel:
    # SD 2.1's text_encoder/config.json structure (its quirky bos/eos/pad ids too), world-sized.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, hidden_act="gelu", projection_dim=TEXT_WIDTH,
        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))


def make_unet(*, upcast_attention: bool = True) -> UNet2DConditionModel:
    """SD 2.1's UNet structure at world size (the student, SD-Turbo-shaped, has upcast off)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=BLOCKS, layers_per_block=1, attention_head_dim=(2, 4, 4),
        cross_attention_dim=TEXT_WIDTH, norm_num_groups=16, use_linear_projection=True,
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


def caption_ids(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, 77) of the captions and (1, 77) of the empty prompt, padded as the pipelines pad."""
    tok = build_sd2_tokenizer()
    return prompt_ids(tok, captions), prompt_ids(tok, [""])


def make_run(folder: Path, pool: Pool, device: torch.device, *, seed: int, vae_dir: Path, progress: bool = True,
             hparams: dict | None = None) -> component.Run:
    h = {**HPARAMS, **(hparams or {})}
    latents = encode_pool(vae_dir, pool, Path(folder))
    ids, empty = caption_ids(pool.captions)
    torch.manual_seed(seed)
    live = torch.nn.ModuleDict({"text_encoder": make_text_encoder(), "unet": make_unet()})
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
        tokens = torch.where(drop[:, None], empty.to(device), ids[index].to(device))
        a = alphas[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        with component.autocast(device, bf16):
            cond = live["text_encoder"](tokens)[0]
            pred = live["unet"](z, t, cond).sample
        snr = alphas[t] / (1 - alphas[t])
        # Min-SNR-gamma for a v-prediction target; None: the plain v loss
        weight = snr.clamp(max=h["min_snr"]) / (snr + 1) if h["min_snr"] else torch.ones_like(snr)
        per_sample = (pred.float() - v).pow(2).mean((1, 2, 3))
        loss = (weight * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live.parameters(), 1.0)
        optimizer.step()
        decay = min(h["ema"], (1 + i) / (10 + i))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), live.parameters()):
                p_ema.lerp_(p, 1 - decay)
        return {"loss": loss.item(), "v_mse": per_sample.mean().item(), "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name="teacher", folder=folder, model=model, optimizer=optimizer, steps=h["steps"], seed=seed,
        progress=progress, lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h,
    )


def finish(model: torch.nn.ModuleDict, out: Path) -> dict:
    """Ship the EMA weights: ``out/unet`` and ``out/text_encoder`` (fp16)."""
    ema = model["ema"]
    component.save_fp16(ema["unet"], out / "unet")
    component.save_fp16(ema["text_encoder"], out / "text_encoder")
    return {"unet_params": sum(p.numel() for p in ema["unet"].parameters()),
            "text_encoder_params": sum(p.numel() for p in ema["text_encoder"].parameters())}
