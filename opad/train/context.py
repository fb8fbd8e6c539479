"""What a training method may use of the loop: :class:`TrainContext`, built by the Trainer.

The method gets this instead of the Trainer, so the loop's own state (step, rollbacks, learning-rate
scale, checkpoints, run log) stays the loop's: a method sees the models, the data, the random
generators and the few loop services it needs (optimizers, the guarded update, prompt encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from opad.diffusion.sampling import encode_prompts

if TYPE_CHECKING:
    from opad.config import TrainConfig
    from opad.models.loading import ModelBundle
    from opad.presets import Preset
    from opad.train.data import ConceptData
    from opad.train.updates import GuardedStep


@dataclass
class TrainContext:
    cfg: TrainConfig  # resolved
    bundle: ModelBundle
    accelerator: Accelerator
    device: torch.device
    data: ConceptData  # the subject's photos
    class_data: ConceptData | None  # --class-dir's (prior preservation)
    # one generator per kind of draw (switching a term off changes no other term's randomness)
    generators: dict[str, torch.Generator]
    token_ids: list[int]  # the modifier token's rows in the tokenizer
    resolution: int
    preset: Preset | None  # the preset run's backbones and offline defaults; None with named models
    gradient_checkpointing: bool
    is_main: bool  # only the main process prints
    progress: bool  # progress bars wanted
    optimizer_step: GuardedStep  # every update goes through it (the loop counts and guards them)

    def make_optimizer(self, params: list, token_params: list, lr: float) -> torch.optim.Optimizer:
        """AdamW over ``params`` and the token rows ``token_params``, in separate groups (each can
        get its own settings later)."""
        groups = [{"params": g} for g in (params, token_params) if g]
        # one multi-tensor step for all weights: torch's fused kernel on CUDA, foreach elsewhere
        step = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                 weight_decay=self.cfg.weight_decay, **step)

    def encode(self, encoder: nn.Module, prompts: list[str]) -> Tensor:
        return encode_prompts(self.bundle, prompts, encoder)

    def randn(self, shape, gen: str) -> Tensor:
        """Standard normal noise from generator ``gen`` (drawn on the CPU, so runs repeat across devices)."""
        return torch.randn(shape, generator=self.generators[gen]).to(self.device)

    def randint(self, high: int, n: int, gen: str) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generators[gen]).to(self.device)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        f = self.bundle.vae_scale_factor
        return (n, self.bundle.student_unet.config.in_channels, self.resolution // f, self.resolution // f)
