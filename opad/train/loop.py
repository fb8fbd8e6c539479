"""The training loop every method shares: ``python -m opad.train`` runs it.

The loop owns the data, the random generators (one per kind of draw, so switching a term off
changes no other term's randomness, and a resumed run continues bit for bit), logging,
checkpoints, previews, the non-finite guard with rollbacks, Ctrl-C and resume. The method
(``--method``, :mod:`opad.train.methods`) owns its trainable parameters, its optimizers, one iteration
and the concept it writes: OPAD's three steps are in :mod:`opad.train.methods.opad`. The method sees
the loop through a :class:`opad.train.context.TrainContext` only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from opad.concept.folder import add_modifier_tokens
from opad.config import TrainConfig
from opad.devices import pick_device
from opad.errors import OpadError, warn
from opad.fsutil import check_can_create
from opad.models.loading import load_models
from opad.presets import PRESETS, default_preset, run_teacher
from opad.train.checkpoint import latest_checkpoint, load_newest_readable, remove_partial, save_checkpoint
from opad.train.context import TrainContext
from opad.train.data import ConceptData, read_images, square_images
from opad.train.methods import method_class
from opad.train.methods.base import Method, StepOutcome
from opad.train.previews import preview_prompts, write_preview
from opad.train.runlog import NullLog, RunLog, plot_losses
from opad.train.updates import GuardedStep

RUN_ARTEFACTS = ("concept", "teacher_concept", "samples", "checkpoints", "tensorboard", "log.csv",
                 "loss_curve.png", "config.json")
# Fields a resumed run may change; any other difference from the saved config is refused.
RESUME_MAY_CHANGE = {"max_steps", "preview_every", "checkpoint_every", "keep_checkpoints", "device",
                     "mixed_precision", "gradient_checkpointing", "resume", "overwrite", "output_dir",
                     "preview_teacher_steps", "preview_prompts"}
_GENERATORS = ("data", "real", "teacher", "student", "align", "swd", "collab", "samples")


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
        # no model named: the preset's models, concept, backbones and defaults (OPAD_PRESET)
        self.preset = default_preset(cfg.preset) if cfg.teacher is None and cfg.student is None else None
        self.cfg = cfg = cfg.resolved(self.preset)
        cfg.validate()  # again: some checks need the resolved values (max-steps, teacher-first steps)
        self.out = Path(cfg.output_dir)
        self._check_resume_config()
        method_cls = method_class(cfg.method)

        device = pick_device(cfg.device)
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
        # Under `accelerate launch` each process draws its own data and noise and the (small)
        # trainable gradients are averaged across processes before every optimizer step.
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mp)
        self.device = self.accelerator.device
        if cfg.instance_dir and not cfg.class_name:
            raise OpadError("--class-name is required with --instance-dir (e.g. --class-name dog)")
        # every photo is read before a model is loaded or a cache written: a refused run costs seconds
        photos = read_images(cfg.instance_dir) if cfg.instance_dir else None
        class_photos = read_images(cfg.class_dir, what="class-prior") if cfg.class_dir else None
        folder = self.preset.folder() if self.preset else None
        teacher, student = (str(folder / "teacher"), str(folder / "student")) if folder else (cfg.teacher, cfg.student)
        if cfg.finetune == "teacher":  # a baseline on the multi-step model: it trains in the student's seat
            student = run_teacher(teacher)
        self.bundle = b = load_models(teacher, student, device=self.device,
                                      load_teacher=method_cls.needs_teacher)
        self.gradient_checkpointing = cfg.gradient_checkpointing == "on" or (
            cfg.gradient_checkpointing == "auto" and self.device.type == "cuda")
        if self.gradient_checkpointing:
            for unet in (b.teacher_unet, b.student_unet):
                if unet is not None:
                    unet.enable_gradient_checkpointing()
            # the student's image is decoded with gradients: at 512 px its decoder's activations outweigh the
            # checkpointed UNets' (docs/fullsize.md); the backbones follow in the method (OpadMethod)
            b.vae.enable_gradient_checkpointing()

        # data
        if cfg.instance_dir:
            instance_dir, self.class_name = Path(cfg.instance_dir), cfg.class_name
        else:  # the preset's own concept (written to the cache on first use)
            bundled_dir, bundled_class = (self.preset or PRESETS["tiny"]).concept()
            instance_dir, self.class_name = Path(bundled_dir), cfg.class_name or bundled_class
        self.instance_dir = instance_dir
        self.resolution = cfg.resolution or b.default_resolution
        if self.resolution % b.vae_scale_factor:
            raise OpadError(f"--resolution must be a multiple of {b.vae_scale_factor}, got {self.resolution}")
        images = square_images(photos or read_images(instance_dir), self.resolution, allow_upscale=cfg.allow_upscale,
                               crop=cfg.crop)
        if cfg.one_shot:
            images = images[:1]
        self.subject = f"{cfg.token} {self.class_name}"
        self.data = ConceptData(images, self.subject, self.resolution, b.vae_scale_factor, flip=cfg.flip,
                                scale_aug=cfg.scale_aug, prompt_style=cfg.prompt_style, sampling=cfg.sampling,
                                seed=cfg.seed * 7919 + 104729 * self.accelerator.process_index)
        self.class_data = None
        if class_photos:
            class_images = square_images(class_photos, self.resolution, allow_upscale=True, crop=cfg.crop)
            self.class_data = ConceptData(class_images, self.class_name, self.resolution, b.vae_scale_factor,
                                          flip=cfg.flip, scale_aug=False)

        # the modifier token (every method names the subject with it)
        init_word = cfg.init_word or method_cls.default_init_word(b.tokenizer, self.class_name)
        self.token_ids = add_modifier_tokens(b.tokenizer, b.text_encoder, [cfg.token], [init_word])

        rank = self.accelerator.process_index
        self.generators = {name: torch.Generator().manual_seed(cfg.seed * 7919 + i + 104729 * rank)
                           for i, name in enumerate(_GENERATORS)}
        self.guarded_step = GuardedStep(self.accelerator, cfg.max_grad_norm)
        self.context = TrainContext(
            cfg=cfg, bundle=b, accelerator=self.accelerator, device=self.device, data=self.data,
            class_data=self.class_data, generators=self.generators, token_ids=self.token_ids,
            resolution=self.resolution, preset=self.preset, gradient_checkpointing=self.gradient_checkpointing,
            is_main=self.is_main, progress=progress, optimizer_step=self.guarded_step)
        self.method: Method = method_cls(self.context)  # its parameters and optimizers
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.step = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.bad_steps = 0
        self.guarded_step.track(list(self.method.optimizers))  # optimizer steps tried / applied, per model
        self._stop_requested = False
        self._seconds_before = 0.0  # training time of the run's earlier segments (resume)
        self._segment_start: float | None = None
        self.accelerator.wait_for_everyone()  # every process has checked --output-dir before any writes

    # ------------------------------------------------------------------ setup helpers
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in self.method.optimizers.values() if o is not None]

    def _check_resume_config(self) -> None:
        saved_path = self.out / "config.json"
        if not self.cfg.resume or not saved_path.is_file():
            return
        saved = json.loads(saved_path.read_text())
        now = dataclasses.asdict(self.cfg)
        # a field newer than the run's config.json is not a change (the run used what it now defaults to)
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k])
        if changed:
            details = "; ".join(f"{k}: run {saved.get(k)!r}, now {now[k]!r}" for k in changed)
            raise OpadError(f"--resume with settings that differ from the run's config.json ({details})")

    # ------------------------------------------------------------------ one iteration
    def before_iteration(self) -> None:
        """Work due before the step's iteration, kept out of its time (the method's)."""
        self.method.before_iteration(self.step)

    def iteration(self) -> StepOutcome:
        return self.method.iteration(self.step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            **self.method.state_dict(),
            "step": self.step,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "generators": {k: g.get_state() for k, g in self.generators.items()},
            "torch_rng": torch.get_rng_state(),
            "data_cursor": self.data.cursor,
            "attempts": dict(self.attempts),
            "updates": dict(self.updates),
            "train_seconds": self.train_seconds,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = int(state["rollbacks"])
        self.method.load_state_dict(state)
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for k, g in self.generators.items():
            g.set_state(state["generators"][k])
        torch.set_rng_state(state["torch_rng"])
        self.data.cursor = int(state["data_cursor"])
        self.guarded_step.attempts = dict(state["attempts"])
        self.guarded_step.updates = dict(state["updates"])
        self._seconds_before = float(state.get("train_seconds", 0.0))  # older checkpoints did not count
        self._apply_lr_scale()

    def _apply_lr_scale(self) -> None:
        for opt, lrs in zip(self.optimizers, self.base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * self.lr_scale

    @property
    def attempts(self) -> dict[str, int]:
        """Optimizer steps tried, per model (skipped ones included)."""
        return self.guarded_step.attempts

    @property
    def updates(self) -> dict[str, int]:
        """Optimizer steps applied, per model."""
        return self.guarded_step.updates

    @property
    def train_seconds(self) -> float:
        """Wall-clock seconds spent in ``train()`` over every segment of the run (a resumed run counts
        the segments before it, up to their last checkpoint); model loading is not counted."""
        running = time.perf_counter() - self._segment_start if self._segment_start is not None else 0.0
        return self._seconds_before + running

    @property
    def is_main(self) -> bool:
        """Only the main process writes files (all hold the same state after averaged updates)."""
        return self.accelerator.is_main_process

    def _check_replicas_agree(self) -> None:
        """With several processes, every replica must hold the same weights (averaged updates)."""
        if self.accelerator.num_processes == 1:
            return
        params = self.method.parameters()
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
    def write_preview(self, step: int) -> Path | None:
        if not self.is_main:
            return None
        return write_preview(self.out, step, cfg=self.cfg, bundle=self.bundle,
                             prompts=preview_prompts(self.cfg, self.subject), resolution=self.resolution,
                             text_encoder=self.method.student_text_encoder)

    def save_concepts(self) -> None:
        if self.is_main:
            self.method.save_concepts(self.out)

    def log_columns(self) -> list[str]:
        return [*self.method.log_columns(), "time/step", "lr_scale"]

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
        never = [m for m in self.attempts if self.attempts[m] and not self.updates[m]]
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
        seconds = self.train_seconds  # the time since that checkpoint was spent all the same
        self.load_state_dict(state)
        self._seconds_before, self._segment_start = seconds, time.perf_counter()
        self.rollbacks, self.lr_scale = rollbacks, scale
        self._apply_lr_scale()
        self.bad_steps = 0
        return f"rollback to step {step} with lr x{scale:g}"

    def train(self, until: int | None = None) -> Path:
        """Run to ``max_steps`` (or stop after step ``until``, with a checkpoint); return the output dir."""
        cfg = self.cfg
        self._start()
        self._segment_start = time.perf_counter()
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
            self._seconds_before, self._segment_start = self.train_seconds, None
            bar.close()
            log.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self.is_main:
            plot_losses(self.out / "log.csv", self.out / "loss_curve.png")
        return self.out


def build_trainer(cfg: TrainConfig, *, progress: bool = True) -> Trainer:
    """The trainer for ``cfg`` (its ``--method`` picks what trains)."""
    return Trainer(cfg, progress=progress)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
