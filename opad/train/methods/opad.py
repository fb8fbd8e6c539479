"""OPAD's method (DESIGN.md §2, paper Algorithm 1): teacher step, student step (alignment +
adversarial), discriminator step, and the collaborative stage.

One iteration:

1. encode the batch prompts once (C);
2. teacher: noise-prediction loss on the photos -> teacher K/V and the modifier token's row;
3. student: pure noise -> one step at t = 999 with stop-grad(C) -> x0 latent -> image; alignment
   with the teacher's CFG x0 of the re-noised latent (weighted per sample by c(t') = ᾱ_t') plus a
   non-saturating loss per discriminator (not weighted) -> student K/V;
4. discriminators: BCE, real photos vs the student images' features from step 3 -> heads only.

Each model has its own optimizer, each random draw its own generator (so switching a term off
changes no other term's randomness, and a resumed run continues bit for bit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from opad.concept.folder import detach_start_token_kv, enable_kv_training, save_concept
from opad.config import DISCRIMINATORS
from opad.diffusion.sampling import decode_latents, student_denoise
from opad.diffusion.schedule import add_noise, c_weight, teacher_x0
from opad.models.backbones import DiscriminatorHead, backbone_features
from opad.train import losses
from opad.train.data import Batch
from opad.train.methods.base import Method, StepOutcome
from opad.train.methods.opad_nets import build_backbones, build_lpips
from opad.train.token_rows import TrainableTokenRows

if TYPE_CHECKING:
    from opad.train.context import TrainContext


@dataclass
class StudentResult:
    terms: dict[str, Tensor]
    fake_features: dict[str, Tensor]  # detached, reused by the discriminator step
    image: Tensor
    z_st: Tensor
    z_tc: Tensor | None = None
    image_tc: Tensor | None = None


class OpadMethod(Method):
    """The teacher, the student and the discriminator heads, trained together."""

    needs_teacher = True

    def __init__(self, ctx: TrainContext) -> None:
        super().__init__(ctx)
        cfg, b = self.cfg, self.bundle
        # the modifier token, in the shared text encoder (and the student's own without STE)
        self._student_text_encoder = b.text_encoder if cfg.shared_text_encoder else copy.deepcopy(b.text_encoder)
        self.teacher_tokens = TrainableTokenRows(b.text_encoder.get_input_embeddings(), ctx.token_ids)
        self.student_tokens = None
        if not cfg.shared_text_encoder:
            self.student_tokens = TrainableTokenRows(self._student_text_encoder.get_input_embeddings(), ctx.token_ids)
        with torch.no_grad():
            self.uncond = self.ctx.encode(b.text_encoder, [""])  # constant: "" has no modifier token

        # trainable parameters and optimizers (one per model)
        self.teacher_kv = enable_kv_training(b.teacher_unet)
        self.student_kv = enable_kv_training(b.student_unet)
        if cfg.detach_start_token:
            detach_start_token_kv(b.teacher_unet)
            detach_start_token_kv(b.student_unet)
        self.backbones = build_backbones(cfg, ctx.preset, self.device, ctx.gradient_checkpointing)
        self.heads = nn.ModuleDict({
            name: DiscriminatorHead(self.backbones[name].feature_dim, seed=cfg.seed + 101 * (i + 1))
            for i, name in enumerate(DISCRIMINATORS) if name in cfg.discriminators
        }).to(self.device)
        self.lpips = (build_lpips(cfg, self.device, random_trunk=ctx.preset is not None) if cfg.lpips_weight > 0
                      else None)
        self.teacher_params = [*self.teacher_kv, self.teacher_tokens.rows]
        self.student_token_rows = self._student_token_rows()
        self.student_params = [*self.student_kv, *self.student_token_rows]
        self.opt_teacher = ctx.make_optimizer(self.teacher_kv, [self.teacher_tokens.rows], cfg.teacher_lr)
        self.opt_student = ctx.make_optimizer(self.student_kv, self.student_token_rows, cfg.student_lr)
        heads = list(self.heads.parameters())
        self.opt_heads = ctx.make_optimizer(heads, [], cfg.head_lr) if heads else None
        self.collab_images = torch.empty(0)
        self.collab_prompts: list[str] = []
        self.collab_start_step = (None if cfg.collab_start is None else int(round(cfg.collab_start * cfg.max_steps)))

    # ------------------------------------------------------------------ setup helpers
    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        return {"teacher": self.opt_teacher, "student": self.opt_student, "heads": self.opt_heads}

    def parameters(self) -> list[Tensor]:
        return [*self.teacher_params, *self.student_params, *self.heads.parameters()]

    @property
    def student_text_encoder(self) -> nn.Module:
        return self._student_text_encoder

    def _student_token_rows(self) -> list[nn.Parameter]:
        """The token rows the student's loss trains (the teacher's loss trains the shared ones).

        Without the teacher nothing else would move the shared token, so the student's loss
        trains it (``--use-teacher false``). Without the shared encoder the student has its own
        token, trained by its loss unless ``--train-student-token false`` (the release keeps the
        student's prompt embeddings detached, train_opad.py L2223).
        """
        if self.student_tokens is not None:
            return [self.student_tokens.rows] if self.cfg.train_student_token else []
        return [] if self.cfg.use_teacher else [self.teacher_tokens.rows]

    def _sync_tokens(self) -> None:
        """Write trained token rows back into their embedding tables."""
        self.teacher_tokens.sync()
        if self.student_tokens is not None:
            self.student_tokens.sync()

    # ------------------------------------------------------------------ the three steps
    def teacher_step(self, batch: Batch, cond: Tensor, out: StepOutcome, noise: Tensor | None = None) -> None:
        """Noise-prediction (v or ε) loss on the photos, masked like Custom Diffusion's."""
        b = self.bundle
        loss = self._teacher_loss(batch, cond, noise)
        out.values["loss/teacher"] = loss.item()
        if self.class_data is not None:
            prior = self.class_data.sample(self.cfg.batch_size, self.generators["teacher"])
            prior_loss = self._teacher_loss(prior, self.ctx.encode(b.text_encoder, prior.prompts))
            out.values["loss/prior"] = prior_loss.item()
            loss = loss + self.cfg.prior_loss_weight * prior_loss
        self.ctx.optimizer_step(self.opt_teacher, self.teacher_params, loss, "teacher", out)
        self.teacher_tokens.sync()

    def _teacher_loss(self, batch: Batch, cond: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.denoising_loss(self.bundle.teacher_unet, self.bundle.teacher_scheduler, batch, cond, "teacher",
                                   noise)

    def student_one_step(self, cond: Tensor, gen: str, noise: Tensor | None = None, *,
                         clamp: bool = True) -> tuple[Tensor, Tensor]:
        """The student's single step from pure noise at t = T-1: (x0 latent, image on the [0, 1] scale).

        ``clamp=False`` for losses (raw decoder output, gradients everywhere); buffers use clamped images.
        """
        b = self.bundle
        if noise is None:
            noise = self.ctx.randn(self.ctx.latent_shape(cond.shape[0]), gen)
        with self.accelerator.autocast():
            z0 = student_denoise(b, cond, noise, steps=1)
            return z0, decode_latents(b, z0, clamp=clamp)

    def _student_features(self, image: Tensor, with_id: bool) -> dict[str, Tensor]:
        """Every backbone feature of the student's image from one fused feature pass: each
        discriminator's, and under ``"id"`` the identity encoder's, shared with its discriminator's
        when the resize agrees (an encoder runs twice only on two differently resized inputs)."""
        cfg = self.cfg
        uses = {name: (self.backbones[name], None) for name in cfg.discriminators}
        shared = cfg.id_encoder in uses and cfg.id_resize == cfg.backbone_resize
        if with_id and not shared:
            uses["id"] = (self.backbones[cfg.id_encoder], cfg.id_resize)
        with self.accelerator.autocast():
            feats = dict(zip(uses, backbone_features(image, list(uses.values()))))
        if with_id and shared:
            feats["id"] = feats[cfg.id_encoder]
        return feats

    def _id_loss(self, f_image: Tensor, target: Tensor) -> Tensor:
        """1 − cos between the identity features of the student's image and a target image, per item."""
        encoder = self.backbones[self.cfg.id_encoder]
        with torch.no_grad(), self.accelerator.autocast():
            f_target = encoder(target, resize=self.cfg.id_resize)
        return losses.cosine_distance(f_image, f_target, tokens=encoder.tokens)

    def student_forward(self, prompts: list[str], cond_s: Tensor, cond_t: Tensor,
                        noise: Tensor | None = None) -> StudentResult:
        """The student's one-step image and every loss term (no update).

        ``noise`` (the release's shared noise) is the student's x_T and the re-noising noise.
        """
        cfg, b = self.cfg, self.bundle
        n = len(prompts)
        z_st, image = self.student_one_step(cond_s, "student", noise, clamp=False)

        terms: dict[str, Tensor] = {}
        align = cfg.use_teacher and any(w > 0 for w in (cfg.mse_weight, cfg.id_weight, cfg.swd_weight, cfg.lpips_weight))
        z_tc = image_tc = None
        feats = self._student_features(image, with_id=align and cfg.id_weight > 0)
        if align:
            tsched = b.teacher_scheduler
            ac_t = tsched.alphas_cumprod
            t2 = self.ctx.randint(tsched.config.num_train_timesteps, n, "align")
            eps2 = self.ctx.randn(z_st.shape, "align") if noise is None else noise
            with torch.no_grad(), self.accelerator.autocast():
                z_noisy = add_noise(z_st.detach(), eps2, t2.cpu(), ac_t)
                z_tc = teacher_x0(b.teacher_unet, z_noisy, t2, cond_t, self.uncond, ac_t,
                                  tsched.config.prediction_type, cfg.guidance_scale)
                needs_image = cfg.id_weight or cfg.swd_weight or cfg.lpips_weight
                image_tc = decode_latents(b, z_tc, clamp=False) if needs_image else None
            c = c_weight(t2.cpu(), ac_t).to(self.device).float()  # per-sample trust in the teacher
            if cfg.mse_weight > 0:
                terms["mse"] = cfg.mse_weight * (c * 0.5 * losses.latent_mse(z_st, z_tc)).mean()
            if cfg.id_weight > 0:
                terms["id"] = cfg.id_weight * (c * self._id_loss(feats["id"], image_tc)).mean()
            if cfg.swd_weight > 0:
                # "signed": the release feeds [-1, 1] images to a Lab conversion made for [0, 1] (L2414)
                x, y = (image * 2 - 1, image_tc * 2 - 1) if cfg.swd_input == "signed" else (image, image_tc)
                swd = losses.ms_swd(x, y, num_scales=cfg.swd_scales, num_projections=cfg.swd_projections,
                                    patch_size=cfg.swd_patch, generator=self.generators["swd"])
                terms["swd"] = cfg.swd_weight * (c * swd).mean()
            if cfg.lpips_weight > 0:
                lp = self.lpips(image * 2 - 1, image_tc * 2 - 1).flatten(1).mean(1)
                terms["lpips"] = cfg.lpips_weight * (c * lp).mean()
        for name in cfg.discriminators if cfg.disc_weight > 0 else ():  # adversarial: not weighted by c(t')
            with self.accelerator.autocast():
                logits = self.heads[name](feats[name]).float()
            terms[f"adv_{name}"] = cfg.disc_weight * losses.generator_loss(logits, cfg.disc_loss).mean()
        fake = {name: feats[name].detach() for name in cfg.discriminators}
        return StudentResult(terms, fake, image.detach(), z_st, z_tc, image_tc)

    def student_step(self, prompts: list[str], cond_s: Tensor, cond_t: Tensor, out: StepOutcome,
                     noise: Tensor | None = None) -> StudentResult:
        self.heads.requires_grad_(False)  # the generator loss must not reach the heads
        try:
            result = self.student_forward(prompts, cond_s, cond_t, noise)
        finally:
            self.heads.requires_grad_(True)
        for key, value in result.terms.items():
            out.values[f"loss/{key}"] = value.item()
        if result.terms:
            total = sum(result.terms.values())
            out.values["loss/student"] = total.item()
            self.ctx.optimizer_step(self.opt_student, self.student_params, total, "student", out)
            self._sync_tokens()
        return result

    def discriminator_step(self, fake_features: dict[str, Tensor], out: StepOutcome, batch: Batch | None = None) -> None:
        """BCE (or hinge) per head: real images vs the student's features; each head clipped on its own."""
        cfg = self.cfg
        if not cfg.discriminators:
            return
        if cfg.disc_real == "batch" and batch is not None:  # the release: the augmented teacher batch (L2561)
            real = (batch.pixels + 1) / 2
        else:
            real = self.data.real_images(cfg.batch_size, self.generators["real"])
            if cfg.collab_disc_real == "mixed" and len(self.collab_prompts):
                idx = torch.randint(0, len(self.collab_prompts), (cfg.batch_size // 2,), generator=self.generators["real"])
                real[: len(idx)] = self.collab_images[idx]
        real = real.to(self.device)
        with torch.no_grad(), self.accelerator.autocast():  # R1 is on the head's input: no image gradient
            real_feats = backbone_features(real, [(self.backbones[name], None) for name in cfg.discriminators])
        total = 0.0
        for name, real_f in zip(cfg.discriminators, real_feats):
            if cfg.r1_weight > 0:
                real_f.requires_grad_(True)
            with self.accelerator.autocast():
                real_logits = self.heads[name](real_f).float()
                fake_logits = self.heads[name](fake_features[name]).float()
            loss = losses.discriminator_loss(real_logits, fake_logits, cfg.disc_loss)
            if cfg.r1_weight > 0:  # R1 on the head's input features
                (grad,) = torch.autograd.grad(real_logits.sum(), real_f, create_graph=True)
                r1 = 0.5 * cfg.r1_weight * grad.pow(2).flatten(1).sum(1).mean()
                out.values[f"loss/r1_{name}"] = r1.item()
                loss = loss + r1
            out.values[f"loss/d_{name}"] = loss.item()
            total = total + loss
        # The release clips the heads before backward, i.e. never (train_opad.py L2567); 0 keeps that.
        clip = [(list(head.parameters()), cfg.head_max_grad_norm) for head in self.heads.values()]
        self.ctx.optimizer_step(self.opt_heads, list(self.heads.parameters()), total, "heads", out, clip)

    # ------------------------------------------------------------------ one iteration
    def next_batch(self) -> Batch:
        batch = self.data.sample(self.cfg.batch_size, self.generators["data"])
        if self.collab_prompts and self.cfg.collab_mix > 0:
            g = self.generators["collab"]
            for i in range(len(batch.prompts)):
                if float(torch.rand((), generator=g)) < self.cfg.collab_mix:
                    j = int(torch.randint(0, len(self.collab_prompts), (1,), generator=g))
                    batch.pixels[i] = self.collab_images[j] * 2 - 1
                    batch.masks[i] = 1
                    batch.prompts[i] = self.collab_prompts[j]
        return batch

    def student_cond(self, prompts: list[str], cond: Tensor) -> Tensor:
        """The student's prompt embeddings: the shared C or its own encoder's; detached (stop-grad)
        unless the student's loss trains a token row."""
        cond_s = cond if self.cfg.shared_text_encoder else self.ctx.encode(self.student_text_encoder, prompts)
        return cond_s if self.student_token_rows else cond_s.detach()

    def iteration(self, step: int) -> StepOutcome:
        cfg, b = self.cfg, self.bundle
        out = StepOutcome()
        batch = self.next_batch()
        # the release draws one noise tensor for all three uses (train_opad.py L2039)
        noise = self.ctx.randn(self.ctx.latent_shape(len(batch.prompts)), "student") if cfg.shared_noise else None
        cond = self.ctx.encode(b.text_encoder, batch.prompts)  # C, once per iteration
        if cfg.use_teacher:
            self.teacher_step(batch, cond, out, noise)
        result = self.student_step(batch.prompts, self.student_cond(batch.prompts, cond), cond.detach(), out, noise)
        self.discriminator_step(result.fake_features, out, batch)
        return out

    # ------------------------------------------------------------------ collaborative stage
    @torch.no_grad()
    def refresh_collab_buffer(self) -> None:
        """Replace the buffer with fresh one-step student samples of training prompts."""
        g = self.generators["collab"]
        prompts = [self.data.prompt(g) for _ in range(self.cfg.collab_buffer)]
        images = []
        for start in range(0, len(prompts), self.cfg.batch_size):
            cond = self.ctx.encode(self.student_text_encoder, prompts[start : start + self.cfg.batch_size])
            images.append(self.student_one_step(cond, "collab")[1].cpu())
        self.collab_images = torch.cat(images)
        self.collab_prompts = prompts

    def before_iteration(self, step: int) -> None:
        """The collaborative buffer, when due."""
        if self._collab_due(step):
            self.refresh_collab_buffer()

    def _collab_due(self, step: int) -> bool:
        s = self.collab_start_step
        return s is not None and step >= s and (step - s) % self.cfg.collab_refresh == 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {
            "teacher_kv": [p.detach().cpu().clone() for p in self.teacher_kv],
            "student_kv": [p.detach().cpu().clone() for p in self.student_kv],
            "teacher_tokens": self.teacher_tokens.rows.detach().cpu().clone(),
            "heads": {k: v.cpu().clone() for k, v in self.heads.state_dict().items()},
            "collab_images": self.collab_images.clone(),
            "collab_prompts": list(self.collab_prompts),
        }
        if self.student_tokens is not None:
            state["student_tokens"] = self.student_tokens.rows.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, v in zip(self.teacher_kv, state["teacher_kv"]):
            p.copy_(v)
        for p, v in zip(self.student_kv, state["student_kv"]):
            p.copy_(v)
        self.teacher_tokens.rows.copy_(state["teacher_tokens"])
        self.teacher_tokens.sync()
        if self.student_tokens is not None:
            self.student_tokens.rows.copy_(state["student_tokens"])
            self.student_tokens.sync()
        self.heads.load_state_dict(state["heads"])
        self.collab_images = state["collab_images"]
        self.collab_prompts = list(state["collab_prompts"])

    # ------------------------------------------------------------------ outputs
    def save_concepts(self, out: Path) -> None:
        b = self.bundle
        self.teacher_tokens.sync()
        token, method = [self.cfg.token], self.cfg.method
        save_concept(out / "concept", b.student_unet, b.tokenizer, self.student_text_encoder, token, method=method)
        save_concept(out / "teacher_concept", b.teacher_unet, b.tokenizer, b.text_encoder, token, method=method)

    def log_columns(self) -> list[str]:
        cfg = self.cfg
        cols = []
        if cfg.use_teacher:
            cols.append("loss/teacher")
            if self.class_data is not None:
                cols.append("loss/prior")
            for name, w in (("mse", cfg.mse_weight), ("id", cfg.id_weight), ("swd", cfg.swd_weight),
                            ("lpips", cfg.lpips_weight)):
                if w > 0:
                    cols.append(f"loss/{name}")
        cols += [f"loss/adv_{n}" for n in cfg.discriminators if cfg.disc_weight > 0]
        cols.append("loss/student")
        cols += [f"loss/d_{n}" for n in cfg.discriminators]
        if cfg.r1_weight > 0:
            cols += [f"loss/r1_{n}" for n in cfg.discriminators]
        cols += [f"grad_norm/{n}" for n in ("teacher", "student", "heads")]
        return cols

