"""Every default of the trainer: the tables, the one order ``resolve`` fills them in, and the words
``--help`` shows for them (``describe``), so that no number is written twice.

A field's value comes from the first of:

1. the user (flag or config file): any value other than the field's declared default;
2. the run's preset (``Preset.train_defaults``: the mini world, tiny), when the run uses its models;
3. the profile (``--profile``, :mod:`opad.config.profiles`), for the fields declared ``FROM_PROFILE``;
4. the method's table (``METHOD_DEFAULTS``: steps, student rate) and ``FALLBACKS`` for what is still unset;
5. the field's declared default.

Last, a method's fixed settings (``fixed_settings``) replace whatever the steps above gave (a baseline has no teacher).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass

from opad.config.choices import BASELINES, DISCRIMINATORS
from opad.config.profiles import describe_default as describe_profile
from opad.config.profiles import profile_defaults
from opad.presets import PRESETS, Preset

if typing.TYPE_CHECKING:
    from opad.config.fields import TrainConfig


class _FromProfile:
    """The default of a field that ``--profile`` decides (see opad/config/profiles.py)."""

    def __repr__(self) -> str:
        return "<from profile>"


FROM_PROFILE = _FromProfile()


@dataclass(frozen=True)
class MethodDefaults:
    """One --method's real-model defaults."""

    steps: int  # iterations, as in the paper's Table 5
    student_lr: float  # as the method's reference script (diffusers' examples)
    lr_per_image: bool = False  # the rate is per image of the batch (Custom Diffusion's scaling)


# Iterations as in the paper's Table 5; learning rates as each method's reference script (diffusers'
# examples: Custom Diffusion's 1e-5 scaled by batch size, DreamBooth 5e-6, LoRA 1e-4, textual inversion 5e-4).
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    "opad": MethodDefaults(1000, 1e-5, lr_per_image=True),
    "teacher-first": MethodDefaults(1000, 1e-5, lr_per_image=True),
    "custom-diffusion": MethodDefaults(1000, 1e-5, lr_per_image=True),
    "dreambooth": MethodDefaults(1000, 5e-6),
    "lora": MethodDefaults(800, 1e-4),
    "textual-inversion": MethodDefaults(4000, 5e-4),
}

# What a field still unset after the user, the preset and the profile gets (unset: None, or FROM_PROFILE for a
# field the profiles leave alone)
FALLBACKS: dict[str, object] = {"discriminators": list(DISCRIMINATORS), "teacher_lr": 1e-5, "head_lr": 1e-4}


def fixed_settings(method: str) -> dict[str, object]:
    """What ``method`` always runs with, whatever the flags say."""
    if method in BASELINES:  # the student alone: OPAD's teacher, discriminator heads and collaborative stage stay off
        return {"use_teacher": False, "discriminators": [], "collab_start": None}
    if method == "teacher-first":  # the baseline (paper Table 6) has no discriminators and no collaborative stage
        return {"discriminators": [], "collab_start": None}
    return {}


def declared_default(f: dataclasses.Field) -> object:
    """The default a field declares (FROM_PROFILE for the fields a profile fills)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def fill_profile(cfg: TrainConfig) -> TrainConfig:
    """A copy with every field the user left to the profile filled in from it (or from FALLBACKS)."""
    defaults = {**FALLBACKS, **profile_defaults(cfg.profile)}
    unset = {f.name: copy.copy(defaults[f.name]) for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) is FROM_PROFILE}  # a copy: no two configs share one default list
    return dataclasses.replace(cfg, **unset)


def resolve(cfg: TrainConfig, preset: Preset | None) -> TrainConfig:
    """A copy with every default filled in, in the order of this module's docstring: ``preset``'s where the
    run is on a preset's models (no --teacher / --student), else the real models'."""
    # a preset's value fills each field the user left at its declared default (None, auto, [], the profile's)
    own = preset.train_defaults if preset else {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unset = {k: copy.copy(v) for k, v in own.items() if getattr(cfg, k) == declared_default(fields[k])}
    c = dataclasses.replace(cfg, **unset)
    c = fill_profile(c)
    c.preset = preset.name if preset else None
    method = METHOD_DEFAULTS[c.method]
    c.max_steps = c.max_steps or method.steps
    if c.student_lr is None:
        c.student_lr = method.student_lr * (c.batch_size if method.lr_per_image else 1)
    for name, value in FALLBACKS.items():
        if getattr(c, name) is None:
            setattr(c, name, copy.copy(value))
    for name, value in fixed_settings(c.method).items():
        setattr(c, name, value)
    if c.lora_alpha is None and c.method == "lora":
        c.lora_alpha = float(c.lora_rank)  # scale 1
    if c.method == "teacher-first":
        c.teacher_first_steps = c.teacher_first_steps or c.max_steps // 2
    return c


def _show(value: object) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _per_method(value: typing.Callable[[MethodDefaults], str]) -> str:
    return "per --method: " + ", ".join(f"{name} {value(d)}" for name, d in METHOD_DEFAULTS.items())


def describe(f: dataclasses.Field) -> str:
    """What ``--help`` shows as a field's default: from the tables ``resolve`` reads, then each preset's own."""
    if f.name == "max_steps":
        text = _per_method(lambda d: str(d.steps))
    elif f.name == "student_lr":
        text = _per_method(lambda d: f"{d.student_lr}" + (" x batch size" if d.lr_per_image else ""))
    elif "shown" in f.metadata:  # a rule rather than a value (e.g. half of --max-steps)
        text = f.metadata["shown"]
    elif declared_default(f) is FROM_PROFILE and describe_profile(f.name):
        text = describe_profile(f.name)
    elif f.name in FALLBACKS:
        text = _show(FALLBACKS[f.name])
    else:
        text = _show(declared_default(f))
    own = [f"{name} preset: {_show(p.train_defaults[f.name])}" for name, p in PRESETS.items()
           if f.name in p.train_defaults]
    return "; ".join([text, *own])
