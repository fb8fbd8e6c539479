"""The teacher-first baseline (paper §12, Table 6): ``python -m opad.train --method teacher-first``.

The teacher trains alone (Custom Diffusion) for ``--teacher-first-steps``; then it draws
``--teacher-first-samples`` images (DDIM, classifier-free guidance) over the training prompts, and
for the remaining steps the student trains on them with the identity loss only. No discriminators,
no collaborative stage (the config resolves both off). Same outputs, resume and logs as OPAD's run:
the samples are part of every checkpoint.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from opad.diffusion.sampling import sample_teacher
from opad.train.methods.base import StepOutcome
from opad.train.methods.opad import OpadMethod


class TeacherFirstMethod(OpadMethod):
    """OPAD's models and steps, run one after the other instead of together."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher_set_images = torch.empty(0)  # the teacher's samples, clamped to [0, 1]
        self.teacher_set_prompts: list[str] = []

    def before_iteration(self, step: int) -> None:
        if step >= self.cfg.teacher_first_steps and not self.teacher_set_prompts:
            self.sample_teacher_set()

    def iteration(self, step: int) -> StepOutcome:
        cfg, b = self.cfg, self.bundle
        out = StepOutcome()
        if step < cfg.teacher_first_steps:
            batch = self.data.sample(cfg.batch_size, self.generators["data"])
            self.teacher_step(batch, self.ctx.encode(b.text_encoder, batch.prompts), out)
            return out
        idx = torch.randint(0, len(self.teacher_set_prompts), (cfg.batch_size,), generator=self.generators["data"])
        prompts = [self.teacher_set_prompts[i] for i in idx]
        with torch.set_grad_enabled(bool(self.student_token_rows)):
            cond_s = self.student_cond(prompts, self.ctx.encode(b.text_encoder, prompts))
        _, image = self.student_one_step(cond_s, "student", clamp=False)
        f_image = self._student_features(image, with_id=True)["id"]
        loss = cfg.id_weight * self._id_loss(f_image, self.teacher_set_images[idx].to(self.device)).mean()
        out.values["loss/id"] = out.values["loss/student"] = loss.item()
        self.ctx.optimizer_step(self.opt_student, self.student_params, loss, "student", out)
        self._sync_tokens()
        return out

    @torch.no_grad()
    def sample_teacher_set(self) -> None:
        """--teacher-first-samples teacher images over training prompts (batched, with a progress bar)."""
        cfg = self.cfg
        g = self.generators["samples"]
        prompts = [self.data.prompt(g) for _ in range(cfg.teacher_first_samples)]
        if self.ctx.is_main:
            print(f"teacher-first: sampling {len(prompts)} teacher images ({cfg.teacher_first_sample_steps} DDIM "
                  "steps each)", file=sys.stderr)
        images = []
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="teacher samples", leave=False,
                          disable=not (self.ctx.progress and self.ctx.is_main)):
            images.append(sample_teacher(self.bundle, prompts[start : start + cfg.batch_size],
                                         steps=cfg.teacher_first_sample_steps, guidance_scale=cfg.guidance_scale,
                                         generator=g, resolution=self.ctx.resolution).cpu())
        self.teacher_set_images = torch.cat(images)
        self.teacher_set_prompts = prompts

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher_set_images": self.teacher_set_images.clone(),
                "teacher_set_prompts": list(self.teacher_set_prompts)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher_set_images = state["teacher_set_images"]
        self.teacher_set_prompts = list(state["teacher_set_prompts"])

    def log_columns(self) -> list[str]:
        return ["loss/teacher", "loss/id", "loss/student", "grad_norm/teacher", "grad_norm/student"]
