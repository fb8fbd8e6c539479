"""The OPAD trainer: teacher step, student step (alignment + adversarial), discriminator step.

One iteration (DESIGN.md §2, paper Algorithm 1):

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
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from opad import losses
from opad.backbones import DiscriminatorHead, FrozenBackbone, backbone_features, build_backbone
from opad.checkpoint import latest_checkpoint, load_newest_readable, remove_partial, save_checkpoint
from opad.config import DISCRIMINATORS, TrainConfig
from opad.data import Batch, ConceptData, load_images
from opad.diffusion import add_noise, c_weight, teacher_x0, unet_prediction, velocity
from opad.errors import OpadError, warn
from opad.example_concept import CLASS_NAME as EXAMPLE_CLASS
from opad.example_concept import example_concept_dir
from opad.fsutil import check_can_create
from opad.models.concept import add_modifier_tokens, detach_start_token_kv, enable_kv_training, save_concept
from opad.models.loading import load_models
from opad.previews import write_preview
from opad.runlog import NullLog, RunLog, plot_losses
from opad.runtime import pick_device
from opad.sampling import decode_latents, encode_prompts, student_denoise
from opad.tokens import TrainableTokenRows

RUN_ARTEFACTS = ("concept", "teacher_concept", "samples", "checkpoints", "tensorboard", "log.csv",
                 "loss_curve.png", "config.json")
# Fields a resumed run may change; any other difference from the saved config is refused.
RESUME_MAY_CHANGE = {"max_steps", "preview_every", "checkpoint_every", "keep_checkpoints", "device",
                     "mixed_precision", "gradient_checkpointing", "resume", "overwrite", "output_dir",
                     "preview_teacher_steps", "preview_prompts"}
_GENERATORS = ("data", "real", "teacher", "student", "align", "swd", "collab", "samples")
_MODELS = ("teacher", "student", "heads")


@dataclass
class StudentResult:
    terms: dict[str, Tensor]
    fake_features: dict[str, Tensor]  # detached, reused by the discriminator step
    image: Tensor
    z_st: Tensor
    z_tc: Tensor | None = None
    image_tc: Tensor | None = None


@dataclass
class StepOutcome:
    values: dict[str, float] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)


def _finite(x: Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a folder holding another run (or other files) unless resuming or overwriting."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise OpadError(f"--output-dir {cfg.output_dir!r} is a file")
    check_can_create(out, "--output-dir")
    if cfg.resume:
        if latest_checkpoint(out) is None:
            raise OpadError(f"nothing to resume in {cfg.output_dir!r}: it has no complete checkpoint")
        return
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise OpadError(
            f"--output-dir {cfg.output_dir!r} already holds files (another run?); pass --resume to continue "
            "that run or --overwrite to replace its files"
        )


class Trainer:
    """Loads and checks everything on construction; ``train()`` writes the run's outputs."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        cfg.validate()
        check_output_dir(cfg)
        self.progress = progress
        tiny = cfg.teacher is None and cfg.student is None
        self.cfg = cfg = cfg.resolved(tiny=tiny)
        cfg.validate()  # again: some checks need the resolved values (max-steps, teacher-first steps)
        self.out = Path(cfg.output_dir)
        self._check_resume_config()

        device = pick_device(cfg.device)
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
        # Under `accelerate launch` each process draws its own data and noise and the (small)
        # trainable gradients are averaged across processes before every optimizer step.
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mp)
        self.device = self.accelerator.device
        if cfg.instance_dir and not cfg.class_name:
            raise OpadError("--class-name is required with --instance-dir (e.g. --class-name dog)")
        self.bundle = b = load_models(cfg.teacher, cfg.student, device=self.device)
        if cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and self.device.type == "cuda"):
            b.teacher_unet.enable_gradient_checkpointing()
            b.student_unet.enable_gradient_checkpointing()

        # data
        instance_dir = cfg.instance_dir or example_concept_dir()
        self.class_name = cfg.class_name or EXAMPLE_CLASS
        self.resolution = cfg.resolution or b.default_resolution
        if self.resolution % b.vae_scale_factor:
            raise OpadError(f"--resolution must be a multiple of {b.vae_scale_factor}, got {self.resolution}")
        images = load_images(instance_dir, self.resolution, allow_upscale=cfg.allow_upscale, crop=cfg.crop)
        if cfg.one_shot:
            images = images[:1]
        self.subject = f"{cfg.token} {self.class_name}"
        self.data = ConceptData(images, self.subject, self.resolution, b.vae_scale_factor, flip=cfg.flip,
                                scale_aug=cfg.scale_aug, prompt_style=cfg.prompt_style, sampling=cfg.sampling,
                                seed=cfg.seed * 7919 + 104729 * self.accelerator.process_index)
        self.class_data = None
        if cfg.class_dir:
            class_images = load_images(cfg.class_dir, self.resolution, allow_upscale=True, what="class-prior",
                                       crop=cfg.crop)
            self.class_data = ConceptData(class_images, self.class_name, self.resolution, b.vae_scale_factor,
                                          flip=cfg.flip, scale_aug=False)

        # the modifier token, in the shared text encoder (and the student's own without STE)
        init_word = cfg.init_word or self.class_name
        self.token_ids = add_modifier_tokens(b.tokenizer, b.text_encoder, [cfg.token], [init_word])
        self.student_text_encoder = b.text_encoder if cfg.shared_text_encoder else copy.deepcopy(b.text_encoder)
        self.teacher_tokens = TrainableTokenRows(b.text_encoder.get_input_embeddings(), self.token_ids)
        self.student_tokens = None
        if not cfg.shared_text_encoder:
            self.student_tokens = TrainableTokenRows(self.student_text_encoder.get_input_embeddings(), self.token_ids)
        with torch.no_grad():
            self.uncond = self._encode(b.text_encoder, [""])  # constant: "" has no modifier token

        # trainable parameters and optimizers (one per model)
        self.teacher_kv = enable_kv_training(b.teacher_unet)
        self.student_kv = enable_kv_training(b.student_unet)
        if cfg.detach_start_token:
            detach_start_token_kv(b.teacher_unet)
            detach_start_token_kv(b.student_unet)
        self.backbones = self._build_backbones(tiny)
        self.heads = nn.ModuleDict({
            name: DiscriminatorHead(self.backbones[name].feature_dim, seed=cfg.seed + 101 * (i + 1))
            for i, name in enumerate(DISCRIMINATORS) if name in cfg.discriminators
        }).to(self.device)
        self.lpips = self._build_lpips(tiny) if cfg.lpips_weight > 0 else None
        self.teacher_params = [*self.teacher_kv, self.teacher_tokens.rows]
        self.student_token_rows = self._student_token_rows()
        self.student_params = [*self.student_kv, *self.student_token_rows]
        self.opt_teacher = self._adamw(self.teacher_kv, [self.teacher_tokens.rows], cfg.teacher_lr)
        self.opt_student = self._adamw(self.student_kv, self.student_token_rows, cfg.student_lr)
        self.opt_heads = self._adamw(list(self.heads.parameters()), [], cfg.head_lr) if len(self.heads) else None
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

        rank = self.accelerator.process_index
        self.generators = {name: torch.Generator().manual_seed(cfg.seed * 7919 + i + 104729 * rank)
                           for i, name in enumerate(_GENERATORS)}
        self.step = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.bad_steps = 0
        self.collab_images = torch.empty(0)
        self.collab_prompts: list[str] = []
        self.attempts = dict.fromkeys(_MODELS, 0)  # optimizer steps tried / applied, per model
        self.updates = dict.fromkeys(_MODELS, 0)
        self.collab_start_step = (None if cfg.collab_start is None else int(round(cfg.collab_start * cfg.max_steps)))
        self._stop_requested = False
        self.accelerator.wait_for_everyone()  # every process has checked --output-dir before any writes

    # ------------------------------------------------------------------ setup helpers
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_teacher, self.opt_student, self.opt_heads) if o is not None]

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

    def _adamw(self, params: list, token_params: list, lr: float) -> torch.optim.Optimizer:
        # K/V and token rows in separate groups, so each can get its own settings later
        groups = [{"params": g} for g in (params, token_params) if g]
        # one multi-tensor step for all K/V weights: torch's fused kernel on CUDA, foreach elsewhere
        step = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                 weight_decay=self.cfg.weight_decay, **step)

    def _check_resume_config(self) -> None:
        saved_path = self.out / "config.json"
        if not self.cfg.resume or not saved_path.is_file():
            return
        saved = json.loads(saved_path.read_text())
        now = dataclasses.asdict(self.cfg)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k])
        if changed:
            details = "; ".join(f"{k}: run {saved.get(k)!r}, now {now[k]!r}" for k in changed)
            raise OpadError(f"--resume with settings that differ from the run's config.json ({details})")

    def _build_backbones(self, tiny: bool) -> dict[str, FrozenBackbone]:
        cfg = self.cfg
        names = list(cfg.discriminators)
        if cfg.use_teacher and cfg.id_weight > 0 and cfg.id_encoder not in names:
            names.append(cfg.id_encoder)
        sources = cfg.backbone_sources()
        backbones = {}
        for name in names:
            source = sources.get(name, "tiny" if tiny else None)
            if source is None:
                raise OpadError(f"the {name} backbone needs weights: pass --backbone-weights {name}=FILE "
                                f"(or {name}=hub to download them)")
            backbones[name] = build_backbone(
                name, source, dino_v2_size=cfg.dino_v2_size, clip_arch=cfg.clip_arch, normalize=cfg.disc_normalize,
                resize=cfg.backbone_resize, ip_adapter=self._ip_adapter_source(source) if name == "clip" else None,
                seed=cfg.seed + 31 * (DISCRIMINATORS.index(name) + 1)).to(self.device)
        return backbones

    def _ip_adapter_source(self, clip_source: str) -> str | None:
        """What ``--ip-adapter auto`` means: a random tiny projection on the tiny clip backbone,
        IP-Adapter's own when the clip backbone is IP-Adapter's image encoder (ViT-H-14), else none."""
        choice = self.cfg.ip_adapter
        if choice == "none":
            return None
        if choice != "auto":
            return choice
        if clip_source == "tiny":
            return "tiny"
        if self.cfg.clip_arch != "ViT-H-14" or not (clip_source.startswith("hub") or Path(clip_source).exists()):
            return None  # a missing weights file is the first problem to report (build_backbone does)
        if clip_source.startswith("hub"):
            return "hub"
        beside = [Path(clip_source).parent / f"ip-adapter_sd15{ext}" for ext in (".safetensors", ".bin")]
        found = [str(p) for p in beside if Path(clip_source).is_dir() and p.is_file()]
        if found:
            return found[0]
        raise OpadError("the clip backbone needs IP-Adapter's image projection for the identity feature: pass "
                        "--ip-adapter FILE (ip-adapter_sd15.safetensors) or hub, or --ip-adapter none for the "
                        "pooled CLIP embedding")

    def _build_lpips(self, tiny: bool) -> nn.Module:
        import lpips

        # The linear calibration layers ship in the lpips package; its VGG/AlexNet trunk comes from
        # torchvision's download unless the run is on the tiny preset (random trunk).
        model = lpips.LPIPS(net=self.cfg.lpips_net, pretrained=True, pnet_rand=tiny, verbose=False)
        return model.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ building blocks
    def _encode(self, encoder: nn.Module, prompts: list[str]) -> Tensor:
        return encode_prompts(self.bundle, prompts, encoder)

    def _randn(self, shape, gen: str) -> Tensor:
        return torch.randn(shape, generator=self.generators[gen]).to(self.device)

    def _randint(self, high: int, n: int, gen: str) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generators[gen]).to(self.device)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        f = self.bundle.vae_scale_factor
        return (n, self.bundle.student_unet.config.in_channels, self.resolution // f, self.resolution // f)

    def _optimizer_step(self, opt, params: list[Tensor], loss: Tensor, name: str, out: StepOutcome,
                        clip_groups: list[tuple[list[Tensor], float]] | None = None) -> None:
        """Backward, clip, and step unless the loss or gradient is non-finite (then skip and record).

        ``clip_groups`` are (parameters, max norm) pairs, each clipped on its own (0: no clip); by
        default all ``params`` against --max-grad-norm. The logged norm is the total before clipping.
        """
        opt.zero_grad(set_to_none=True)
        self.attempts[name] += 1
        if not _finite(loss):
            out.nonfinite.append(f"{name}:loss")
            return
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        norms = [torch.nn.utils.clip_grad_norm_([p for p in group if p.grad is not None],
                                                limit if limit > 0 else math.inf)
                 for group, limit in clip_groups or [(params, self.cfg.max_grad_norm)]]
        norm = torch.stack([n.float() for n in norms]).norm()
        out.values[f"grad_norm/{name}"] = float(norm)
        if not _finite(norm):
            opt.zero_grad(set_to_none=True)
            out.nonfinite.append(f"{name}:grad")
            return
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.updates[name] += 1

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
            prior_loss = self._teacher_loss(prior, self._encode(b.text_encoder, prior.prompts))
            out.values["loss/prior"] = prior_loss.item()
            loss = loss + self.cfg.prior_loss_weight * prior_loss
        self._optimizer_step(self.opt_teacher, self.teacher_params, loss, "teacher", out)
        self.teacher_tokens.sync()

    def _teacher_loss(self, batch: Batch, cond: Tensor, noise: Tensor | None = None) -> Tensor:
        b = self.bundle
        sched = b.teacher_scheduler
        ac = sched.alphas_cumprod
        with torch.no_grad(), self.accelerator.autocast():
            dist = b.vae.encode(batch.pixels.to(self.device)).latent_dist
            latents = dist.sample(generator=self.generators["teacher"]).float() * b.vae.config.scaling_factor
        if noise is None:
            noise = self._randn(latents.shape, "teacher")
        t = self._randint(sched.config.num_train_timesteps, latents.shape[0], "teacher")
        z_t = add_noise(latents, noise, t.cpu(), ac)
        with self.accelerator.autocast():
            pred = unet_prediction(b.teacher_unet, z_t, t, cond)
        target = velocity(latents, noise, t.cpu(), ac) if sched.config.prediction_type == "v_prediction" else noise
        mask = batch.masks.to(self.device)
        # "sum": the release sums the 4 channels against its 1-channel mask (train_opad.py L2143), 4x the mean
        channels = pred.shape[1] if self.cfg.teacher_loss_channels == "mean" else 1
        per_item = ((pred - target) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * channels).clamp(min=1)
        return per_item.mean()

    def student_one_step(self, cond: Tensor, gen: str, noise: Tensor | None = None, *,
                         clamp: bool = True) -> tuple[Tensor, Tensor]:
        """The student's single step from pure noise at t = T-1: (x0 latent, image on the [0, 1] scale).

        ``clamp=False`` for losses (raw decoder output, gradients everywhere); buffers use clamped images.
        """
        b = self.bundle
        if noise is None:
            noise = self._randn(self.latent_shape(cond.shape[0]), gen)
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
            t2 = self._randint(tsched.config.num_train_timesteps, n, "align")
            eps2 = self._randn(z_st.shape, "align") if noise is None else noise
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
            self._optimizer_step(self.opt_student, self.student_params, total, "student", out)
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
        self._optimizer_step(self.opt_heads, list(self.heads.parameters()), total, "heads", out, clip)

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
        cond_s = cond if self.cfg.shared_text_encoder else self._encode(self.student_text_encoder, prompts)
        return cond_s if self.student_token_rows else cond_s.detach()

    def iteration(self) -> StepOutcome:
        cfg, b = self.cfg, self.bundle
        out = StepOutcome()
        batch = self.next_batch()
        # the release draws one noise tensor for all three uses (train_opad.py L2039)
        noise = self._randn(self.latent_shape(len(batch.prompts)), "student") if cfg.shared_noise else None
        cond = self._encode(b.text_encoder, batch.prompts)  # C, once per iteration
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
            cond = self._encode(self.student_text_encoder, prompts[start : start + self.cfg.batch_size])
            images.append(self.student_one_step(cond, "collab")[1].cpu())
        self.collab_images = torch.cat(images)
        self.collab_prompts = prompts

    def before_iteration(self) -> None:
        """Work due before the step's iteration (kept out of its time): the collaborative buffer."""
        if self._collab_due(self.step):
            self.refresh_collab_buffer()

    def _collab_due(self, step: int) -> bool:
        s = self.collab_start_step
        return s is not None and step >= s and (step - s) % self.cfg.collab_refresh == 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "teacher_kv": [p.detach().cpu().clone() for p in self.teacher_kv],
            "student_kv": [p.detach().cpu().clone() for p in self.student_kv],
            "teacher_tokens": self.teacher_tokens.rows.detach().cpu().clone(),
            "heads": {k: v.cpu().clone() for k, v in self.heads.state_dict().items()},
            "optimizers": [o.state_dict() for o in self.optimizers],
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "torch_rng": torch.get_rng_state(),
            "collab_images": self.collab_images.clone(),
            "collab_prompts": list(self.collab_prompts),
            "data_cursor": self.data.cursor,
            "attempts": dict(self.attempts),
            "updates": dict(self.updates),
        }
        if self.student_tokens is not None:
            state["student_tokens"] = self.student_tokens.rows.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = int(state["rollbacks"])
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
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        torch.set_rng_state(state["torch_rng"])
        self.collab_images = state["collab_images"]
        self.collab_prompts = list(state["collab_prompts"])
        self.data.cursor = int(state["data_cursor"])
        self.attempts, self.updates = dict(state["attempts"]), dict(state["updates"])
        self._apply_lr_scale()

    def _apply_lr_scale(self) -> None:
        for opt, lrs in zip(self.optimizers, self.base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * self.lr_scale

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (all hold the same state after averaged updates)."""
        return self.accelerator.is_main_process

    def _check_replicas_agree(self) -> None:
        """With several processes, every replica must hold the same weights (averaged updates)."""
        if self.accelerator.num_processes == 1:
            return
        params = [*self.teacher_params, *self.student_params, *self.heads.parameters()]
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().view(1).to(self.device)
        sums = self.accelerator.gather(checksum)
        if not torch.allclose(sums, sums[0]):
            raise OpadError(f"training replicas diverged at step {self.step} (parameter sums {sums.tolist()})")

    def save_checkpoint(self) -> Path | None:
        self._check_replicas_agree()
        path = None
        if self.is_main:
            path = save_checkpoint(self.out, self.step, self.state_dict(), keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ outputs
    def preview_prompts(self) -> list[str]:
        """The preview prompts, ``{}`` replaced by the token + class (other braces are the user's text)."""
        templates = self.cfg.preview_prompts or ["a photo of a {}", "a {} on the beach"]
        return [t.replace("{}", self.subject) for t in templates]

    def write_preview(self, step: int) -> Path | None:
        return write_preview(self, step) if self.is_main else None

    def save_concepts(self) -> None:
        if not self.is_main:
            return
        b = self.bundle
        self.teacher_tokens.sync()
        save_concept(self.out / "concept", b.student_unet, b.tokenizer, self.student_text_encoder, [self.cfg.token])
        save_concept(self.out / "teacher_concept", b.teacher_unet, b.tokenizer, b.text_encoder, [self.cfg.token])

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
        cols += ["time/step", "lr_scale"]
        return cols

    # ------------------------------------------------------------------ the loop
    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def _start(self) -> None:
        """Fresh run: clear old artefacts (with --overwrite) and write config.json; resume: restore."""
        if self.cfg.resume:
            removed = remove_partial(self.out)
            step, path, state, unreadable = load_newest_readable(self.out)
            for bad, why in unreadable:
                warn(f"checkpoint {bad.name} is unreadable ({why}); falling back to an older one")
            self.load_state_dict(state)
            print(f"resuming from {path} (step {step})" + (f"; removed {len(removed)} partial checkpoint(s)"
                                                            if removed else ""), file=sys.stderr)
            return
        if self.is_main:
            if self.out.is_dir() and self.cfg.overwrite:
                for name in RUN_ARTEFACTS:
                    p = self.out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(self.cfg.to_json())
        self.save_checkpoint()  # step 0: a rollback target from the start

    def _check_some_update_applied(self) -> None:
        """A model whose every update was skipped (non-finite) has learnt nothing: fail, don't save it."""
        never = [m for m in _MODELS if self.attempts[m] and not self.updates[m]]
        if never:
            raise OpadError(f"no update of the {' or '.join(never)} was applied in {self.step} step(s): every one was "
                            "non-finite (see log.csv); lower the learning rates or check the data")

    def _rollback(self, reason: str) -> str:
        if latest_checkpoint(self.out) is None or self.rollbacks >= self.cfg.max_rollbacks:
            raise OpadError(
                f"training diverged at step {self.step}: {self.cfg.max_bad_steps} non-finite steps in a row ({reason})"
                f" after {self.rollbacks} rollback(s); lower the learning rates or check the data"
            )
        rollbacks, scale = self.rollbacks + 1, self.lr_scale * self.cfg.rollback_lr_factor
        step, _, state, _ = load_newest_readable(self.out)
        self.load_state_dict(state)
        self.rollbacks, self.lr_scale = rollbacks, scale
        self._apply_lr_scale()
        self.bad_steps = 0
        return f"rollback to step {step} with lr x{scale:g}"

    def train(self, until: int | None = None) -> Path:
        """Run to ``max_steps`` (or stop after step ``until``, with a checkpoint); return the output dir."""
        cfg = self.cfg
        self._start()
        log = RunLog(self.out, self.log_columns(), start_step=self.step) if self.is_main else NullLog()
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="opad", disable=not (self.progress and self.is_main),
                   dynamic_ncols=True)
        try:
            while self.step < cfg.max_steps:
                if self.step % cfg.preview_every == 0:
                    self.write_preview(self.step)
                self.before_iteration()
                start = time.perf_counter()
                outcome = self.iteration()
                outcome.values["time/step"] = time.perf_counter() - start
                outcome.values["lr_scale"] = self.lr_scale
                event = ""
                if outcome.nonfinite:
                    self.bad_steps += 1
                    event = "skipped non-finite " + ",".join(outcome.nonfinite)
                    print(f"step {self.step}: {event}", file=sys.stderr)
                else:
                    self.bad_steps = 0
                log.write(self.step, outcome.values, event)
                self.step += 1
                bar.update(1)
                bar.set_postfix({k.split("/", 1)[1]: f"{v:.3g}" for k, v in outcome.values.items()
                                 if k in ("loss/teacher", "loss/student", "loss/d_clip")})
                if self.bad_steps >= cfg.max_bad_steps:
                    failed_step = self.step - 1
                    message = self._rollback(event)
                    print(message, file=sys.stderr)
                    log.write(failed_step, {}, message)
                    bar.n = self.step
                    continue
                stop = self._stop_requested or (until is not None and self.step >= until)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or stop:
                    self.save_checkpoint()
                if stop:
                    print(f"stopped at step {self.step}; continue with --resume", file=sys.stderr)
                    return self.out
            self._check_some_update_applied()
            self.write_preview(self.step)
            self.save_concepts()
        finally:
            bar.close()
            log.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self.is_main:
            plot_losses(self.out / "log.csv", self.out / "loss_curve.png")
        return self.out


def build_trainer(cfg: TrainConfig, *, progress: bool = True) -> Trainer:
    """The trainer ``cfg`` asks for: OPAD's, or the teacher-first baseline's."""
    if cfg.teacher_first:
        from opad.teacher_first import TeacherFirstTrainer

        return TeacherFirstTrainer(cfg, progress=progress)
    return Trainer(cfg, progress=progress)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
