"""Refusing a TrainConfig value outside its field's domain, with one line that names the flag."""

from __future__ import annotations

import dataclasses
import math
import typing

from opad.config.choices import BASELINES, DEVICE_PATTERN, DISCRIMINATORS, MAX_SEED
from opad.config.defaults import FROM_PROFILE, fill_profile
from opad.config.profiles import PROFILES
from opad.errors import OpadError
from opad.presets import PRESETS

if typing.TYPE_CHECKING:
    from opad.config.fields import TrainConfig

_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def split_list(text: str) -> list[str]:
    """A comma list ('none' alone: the empty list)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    return [] if items == ["none"] else items


def check_type(name: str, value, tp, where: str):
    """``value`` as field type ``tp`` (an int for a float, a comma string for a list), or an OpadError
    naming the field. ``FROM_PROFILE`` passes: the profile fills it in later."""
    if value is FROM_PROFILE:
        return value
    args = typing.get_args(tp)
    if type(None) in args:
        return None if value is None else check_type(name, value, next(a for a in args if a is not type(None)), where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (bool, str) and isinstance(value, tp) or tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return split_list(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    kind = _KINDS.get(tp, "a list of strings (or one comma-separated string)")
    raise OpadError(f"{where}{name} must be {kind}, got {value!r:.80}")


def validate(cfg: TrainConfig) -> None:
    """Refuse a value outside its field's domain, naming the flag (after the profile is applied)."""
    if cfg.profile not in PROFILES:
        raise OpadError(f"--profile must be one of {', '.join(PROFILES)}, got {cfg.profile!r}")
    c = fill_profile(cfg)
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(c):
        value, flag = getattr(c, f.name), "--" + f.name.replace("_", "-")
        check_type(flag, value, hints[f.name], "")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not (math.isfinite(value) and value >= 0):  # no field takes a negative or NaN
            raise OpadError(f"{flag} must be a finite number >= 0, got {value}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise OpadError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    if c.preset is not None and c.preset not in PRESETS:
        raise OpadError(f"--preset must be one of {', '.join(PRESETS)}, got {c.preset!r}")
    if c.preset is not None and (c.teacher or c.student):  # a preset's models and a named one would mix
        raise OpadError("--preset picks the models only when neither --teacher nor --student is given; "
                        "drop --preset, or the model flags")
    bad = [d for d in c.discriminators if d not in DISCRIMINATORS]
    if bad:
        raise OpadError(f"unknown discriminator {bad[0]!r}; choose from {', '.join(DISCRIMINATORS)} (or 'none')")
    if c.mixed_precision not in ("auto", "no", "bf16"):
        raise OpadError(f"--mixed-precision must be auto, no or bf16 (fp16 would need loss scaling), "
                        f"got {c.mixed_precision!r}")
    if c.gradient_checkpointing not in ("auto", "on", "off"):
        raise OpadError(f"--gradient-checkpointing must be auto, on or off, got {c.gradient_checkpointing!r}")
    if c.collab_start is not None and not 0 <= c.collab_start <= 1:
        raise OpadError(f"--collab-start must be a fraction in [0, 1] or none, got {c.collab_start}")
    if not 0 <= c.collab_mix <= 1:
        raise OpadError(f"--collab-mix must be in [0, 1], got {c.collab_mix}")
    for name in ("batch_size", "preview_every", "checkpoint_every", "keep_checkpoints", "collab_refresh",
                 "collab_buffer", "swd_scales", "swd_projections", "swd_patch", "max_bad_steps",
                 "teacher_first_samples", "teacher_first_sample_steps", "preview_teacher_steps"):
        if getattr(c, name) < 1:
            raise OpadError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    if c.max_steps is not None and c.max_steps < 1:
        raise OpadError(f"--max-steps must be at least 1, got {c.max_steps}")
    for name in ("adam_beta1", "adam_beta2"):
        if not getattr(c, name) < 1:
            raise OpadError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(c, name)}")
    if not 0 < c.rollback_lr_factor <= 1:
        raise OpadError(f"--rollback-lr-factor must be in (0, 1], got {c.rollback_lr_factor}")
    if c.seed > MAX_SEED:
        raise OpadError(f"--seed must be in 0..{MAX_SEED}, got {c.seed}")
    if c.resolution is not None and c.resolution < 8:
        raise OpadError(f"--resolution must be a positive multiple of 8, got {c.resolution}")
    if c.swd_patch % 2 == 0:
        raise OpadError(f"--swd-patch must be odd (a patch centred on each pixel), got {c.swd_patch}")
    if not DEVICE_PATTERN.match(c.device):
        raise OpadError(f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    if c.finetune == "teacher" and c.method not in BASELINES:
        raise OpadError(f"--finetune teacher is for the baselines ({', '.join(BASELINES)}); "
                        f"--method {c.method} trains both models")
    if c.lora_rank < 1:
        raise OpadError(f"--lora-rank must be at least 1, got {c.lora_rank}")
    if c.method == "teacher-first":
        if not c.use_teacher:
            raise OpadError("--teacher-first needs the teacher; it cannot be combined with --use-teacher false")
        if c.teacher_first_steps is not None and c.teacher_first_steps < 1:
            raise OpadError(f"--teacher-first-steps must be at least 1, got {c.teacher_first_steps}")
        if c.max_steps is not None and c.teacher_first_steps is not None and c.teacher_first_steps >= c.max_steps:
            raise OpadError(f"--teacher-first-steps ({c.teacher_first_steps}) must be below --max-steps "
                            f"({c.max_steps}): the student trains in the steps after it")
    for entry in c.backbone_weights:
        name, _, value = entry.partition("=")
        if name not in DISCRIMINATORS or not value:
            raise OpadError(f"--backbone-weights entry {entry!r} must be NAME=FILE, NAME=DIR or NAME=hub, NAME in "
                            f"{DISCRIMINATORS}")
