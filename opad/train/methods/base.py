"""What a training method supplies to the shared loop (:class:`opad.train.loop.Trainer`).

The loop owns the data, the random generators, logging, checkpoints, previews, the non-finite
guard, rollbacks and resume. A method owns its trainable parameters, their optimizers, one
iteration, the extra state it checkpoints and the concept it writes. It sees the loop only through
a :class:`opad.train.context.TrainContext`; the loop calls it only through :class:`Method`'s hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from opad.diffusion.schedule import add_noise, unet_prediction, velocity
from opad.train.data import Batch

if TYPE_CHECKING:
    from opad.train.context import TrainContext


@dataclass
class StepOutcome:
    """One iteration's logged values, and the updates skipped as non-finite ("model:loss"/"model:grad")."""

    values: dict[str, float] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)


class Method:
    """The base: shortcuts to the loop's context plus the hooks every method fills in."""

    needs_teacher = False  # load the teacher model (the baselines run on the student alone)

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.cfg, self.bundle, self.accelerator, self.device = ctx.cfg, ctx.bundle, ctx.accelerator, ctx.device
        self.data, self.class_data, self.generators = ctx.data, ctx.class_data, ctx.generators

    @classmethod
    def default_init_word(cls, tokenizer, class_name: str) -> str:
        """The word the modifier token starts from when --init-word is not given."""
        return class_name

    # ------------------------------------------------------------------ shared by the methods
    def denoising_loss(self, unet: nn.Module, scheduler, batch: Batch, cond: Tensor, gen: str,
                       noise: Tensor | None = None) -> Tensor:
        """Custom Diffusion's noise-prediction (v or ε) loss on ``batch``'s photos at random timesteps,
        masked to the photo's area (scale augmentation pads it)."""
        b = self.bundle
        ac = scheduler.alphas_cumprod
        with torch.no_grad(), self.accelerator.autocast():
            dist = b.vae.encode(batch.pixels.to(self.device)).latent_dist
            latents = dist.sample(generator=self.generators[gen]).float() * b.vae.config.scaling_factor
        if noise is None:
            noise = self.ctx.randn(latents.shape, gen)
        t = self.ctx.randint(scheduler.config.num_train_timesteps, latents.shape[0], gen)
        z_t = add_noise(latents, noise, t.cpu(), ac)
        with self.accelerator.autocast():
            pred = unet_prediction(unet, z_t, t, cond)
        target = velocity(latents, noise, t.cpu(), ac) if scheduler.config.prediction_type == "v_prediction" else noise
        mask = batch.masks.to(self.device)
        # "sum": the release sums the 4 channels against its 1-channel mask (train_opad.py L2143), 4x the mean
        channels = pred.shape[1] if self.cfg.teacher_loss_channels == "mean" else 1
        per_item = ((pred - target) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * channels).clamp(min=1)
        return per_item.mean()

    # ------------------------------------------------------------------ what each method supplies
    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        """Optimizer per model name (the names of the logged grad norms and update counts; None:
        that model has nothing to train in this configuration)."""
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        """Every trained tensor (checked equal across processes before each checkpoint)."""
        raise NotImplementedError

    @property
    def student_text_encoder(self) -> nn.Module:
        """The text encoder the student's prompts go through (previews, generation)."""
        return self.bundle.text_encoder

    def before_iteration(self, step: int) -> None:
        """Work due before step ``step``'s iteration, kept out of its time."""

    def iteration(self, step: int) -> StepOutcome:
        """Step ``step``'s updates (each through ``ctx.optimizer_step``) and its logged values."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The method's own state for a checkpoint (the loop adds optimizers, generators, step)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def log_columns(self) -> list[str]:
        """The log.csv columns of its losses and grad norms (the loop adds time and lr scale)."""
        raise NotImplementedError

    def save_concepts(self, out: Path) -> None:
        """Write the trained concept(s) under ``out`` (``out/concept`` is the student's)."""
        raise NotImplementedError
