"""The mini world's one-step student: SD-Turbo's conventions, distilled from the world teacher.

SD-Turbo is SD 2.1's UNet fine-tuned to predict ε at t = 999 (Euler, trailing spacing, no CFG).
The world student has the teacher's UNet structure with upcast attention off, as SD-Turbo's
config has, and starts from the teacher's weights, as SD-Turbo started from SD 2.1's.

Distillation is regression on the teacher's deterministic sampler (Luhman & Luhman, 2021; the
regression term of DMD, Yin et al., 2024): for noise n and a caption, the teacher's 25-step DDIM
with CFG 7.5 is a fixed map n -> x0, and the student learns it in one step, the loss being the
MSE between latents. SD-Turbo's own method, adversarial diffusion distillation, needs a
discriminator on a large backbone and far more compute than a 2-core CPU has; regression needs
only the pairs, which a CPU can draw in minutes at 16x16 latents, and converges without tuning.
Its known weakness, averaging where the map is hard to fit, shows as blur rather than wrong
content. The pairs are drawn once into the component folder, in chunks (a cut-off run redraws
only missing chunks), and training shuffles them with the step's generator.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from tqdm.auto import tqdm

from opad.diffusion.schedule import (
    ddim_sample,
    guided_prediction,
    leading_timesteps,
    turbo_initial_latent,
    unet_prediction,
)
from opad.diffusion.schedulers import student_scheduler, teacher_scheduler
from opad.world.components import component, teacher
from opad.world.pool import Pool

HPARAMS = dict(steps=3000, batch=64, lr=1e-3, warmup=100, ema=0.999, pairs=9216, pair_batch=128,
               teacher_steps=25, guidance=7.5, checkpoint_every=100, check_samples=None)
TURBO_T = 999  # SD-Turbo's single timestep


def make_unet() -> UNet2DConditionModel:
    """The teacher's structure with SD-Turbo's config: upcast attention off, ε-prediction (scheduler)."""
    return teacher.make_unet(upcast_attention=False)


def student_x0(unet: torch.nn.Module, noise: torch.Tensor, cond: torch.Tensor, alphas: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The student's 1-step latent from noise, as opad's sampler and diffusers' Euler pipeline compute it
    (``alphas``: the student scheduler's ᾱ on noise's device, to pass in a loop)."""
    alphas = student_scheduler().alphas_cumprod.to(noise.device) if alphas is None else alphas
    return ddim_sample(lambda z, t: unet_prediction(unet, z, t, cond), turbo_initial_latent(noise, TURBO_T, alphas),
                       [TURBO_T], alphas, "epsilon")


@torch.no_grad()
def teacher_x0(unet: torch.nn.Module, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               steps: int, guidance: float) -> torch.Tensor:
    """The teacher's latent from noise: DDIM with CFG, as ``StableDiffusionPipeline`` samples it."""
    sched = teacher_scheduler()
    alphas = sched.alphas_cumprod.to(noise.device)
    return ddim_sample(lambda z, t: guided_prediction(unet, z, t, cond, uncond, guidance), noise,
                       leading_timesteps(steps, sched.config.num_train_timesteps, sched.config.steps_offset),
                       alphas, "v_prediction", final_alpha_cumprod=alphas[0])


def draw_pairs(folder: Path, teacher_unet: torch.nn.Module, states: torch.Tensor, empty: torch.Tensor, *, seed: int,
               h: dict, device: torch.device, progress: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``h["pairs"]`` (noise, caption index, teacher latent) triples, drawn in chunks of
    ``h["pair_batch"]`` into ``folder/pairs`` (each chunk a pure function of (seed, chunk)), and what
    drawing them cost: each chunk keeps its own drawing time, so an interrupted run's total is whole."""
    out = Path(folder) / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    size = h["pair_batch"]
    bf16 = component.bf16_fast(device)
    chunks = range((h["pairs"] + size - 1) // size)
    noises, whichs, targets, seconds = [], [], [], []
    for k in tqdm(chunks, desc="teacher pairs", unit="chunk", disable=not progress):
        path = out / f"chunk-{k:04d}.npz"
        if not path.is_file():
            t0 = time.perf_counter()
            g = component.step_generator(seed + 1000, k)
            which = torch.randint(len(states), (size,), generator=g)
            noise = torch.randn(size, 4, 16, 16, generator=g)
            with component.autocast(device, bf16):  # the UNet only: opad.diffusion.schedule steps in fp32
                x0 = teacher_x0(teacher_unet, noise.to(device), states[which.to(device)], empty, h["teacher_steps"],
                                h["guidance"]).cpu()
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, noise=noise.numpy(), which=which.numpy(), x0=x0.numpy(), seconds=time.perf_counter() - t0)
            tmp.replace(path)
        with np.load(path) as f:
            noises.append(torch.from_numpy(f["noise"]))
            whichs.append(torch.from_numpy(f["which"]))
            targets.append(torch.from_numpy(f["x0"]))
            if "seconds" in f:  # chunks drawn before chunks kept their time have none
                seconds.append(float(f["seconds"]))
    n = h["pairs"]
    cost = {"pair_seconds": round(sum(seconds), 1), "pair_chunks": len(chunks), "pair_chunks_timed": len(seconds)}
    return torch.cat(noises)[:n], torch.cat(whichs)[:n], torch.cat(targets)[:n], cost


def make_run(folder: Path, pool: Pool, device: torch.device, *, seed: int, clip_dir: Path, teacher_dir: Path,
             progress: bool = True, hparams: dict | None = None) -> component.Run:
    h = {**HPARAMS, **(hparams or {})}
    states, _, empty = teacher.caption_embeddings(clip_dir, pool.captions, device)
    teacher_unet = UNet2DConditionModel.from_pretrained(teacher_dir, torch_dtype=torch.float32).to(device).eval()
    teacher_unet.set_attn_processor(AttnProcessor())  # faster on CPUs, as in the teacher's training
    noise, which, target, cost = draw_pairs(folder, teacher_unet, states, empty, seed=seed, h=h, device=device,
                                      progress=progress)
    live = make_unet()
    live.load_state_dict(teacher_unet.state_dict())  # SD-Turbo starts from SD 2.1
    del teacher_unet
    live.set_attn_processor(AttnProcessor())
    ema = copy.deepcopy(live).requires_grad_(False)
    model = torch.nn.ModuleDict({"live": live, "ema": ema}).to(device)
    optimizer = torch.optim.AdamW(live.parameters(), lr=h["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    bf16 = component.bf16_fast(device)
    alphas = student_scheduler().alphas_cumprod.to(device)

    def step(i: int, g: torch.Generator) -> dict[str, float]:
        index = torch.randint(len(noise), (h["batch"],), generator=g)
        with component.autocast(device, bf16):
            x0 = student_x0(live, noise[index].to(device), states[which[index].to(device)], alphas)
        loss = (x0.float() - target[index].to(device)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live.parameters(), 1.0)
        optimizer.step()
        component.ema_update(ema, live, i, h["ema"])
        return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    return component.Run(
        name="student", folder=folder, model=model, optimizer=optimizer, steps=h["steps"], seed=seed,
        progress=progress, lr=lambda i: component.cosine_lr(h["lr"], i, h["steps"], h["warmup"]), step=step,
        checkpoint_every=h["checkpoint_every"], hparams=h, prepare=cost,
    )
