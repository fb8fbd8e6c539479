"""What the commands run on when no model is named: the mini world (default) or the tiny random preset.

``OPAD_PRESET=world|tiny`` picks it for every command (train, generate, export, serve, reproduce).

- ``world``: the mini world's trained models (:mod:`opad.world`): an SD 2.1-shaped teacher and an
  SD-Turbo-shaped student that draw recognisable 64x64 scenes, its dino_v1 / dino_v2 / clip
  backbones, and a held-out world concept to learn. Training on it visibly learns in minutes.
- ``tiny``: random models of the same classes (:mod:`opad.presets.tiny`): the fastest way to run every code
  path, for unit tests; what it draws is noise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from opad.errors import OpadError

ENV = "OPAD_PRESET"


@dataclass(frozen=True)
class Preset:
    name: str
    folder: Callable[[], Path]  # holds teacher/ and student/, diffusers pipeline folders
    backbones: Callable[[], dict[str, str]]  # backbone name -> its --backbone-weights source
    concept: Callable[[], tuple[Path, str]]  # the bundled concept: its photos' folder and class word
    # TrainConfig fields it sets when the user did not (before the profile's and the method's: opad.config.defaults)
    train_defaults: dict = field(default_factory=dict)


def _tiny_folder() -> Path:
    from opad.presets.tiny import tiny_preset_dir

    return tiny_preset_dir()


def _tiny_concept() -> tuple[Path, str]:
    from opad.presets.example_concept import CLASS_NAME, example_concept_dir

    return example_concept_dir(), CLASS_NAME


def _world_folder() -> Path:
    from opad.world.preset import world_preset_dir

    return world_preset_dir()


def _world_backbones() -> dict[str, str]:
    from opad.world.layout import SHIPPED

    return {name: str(SHIPPED / name) for name in ("dino_v1", "dino_v2", "clip") if (SHIPPED / name).is_dir()}


WORLD_CONCEPT = "checkered_mug"  # the bundled world concept python -m opad.train learns by default


def _world_concept() -> tuple[Path, str]:
    from opad.world.render.concepts import CONCEPTS, concepts_dir

    concept = next(c for c in CONCEPTS if c.name == WORLD_CONCEPT)
    return concepts_dir() / concept.name, concept.class_word


PRESETS: dict[str, Preset] = {
    "world": Preset("world", _world_folder, _world_backbones, _world_concept,
                    # the world's UNets and heads are small and start far from the concept: faster rates, fewer
                    # steps (see the README's "Training on the mini world"); the world's clip has no IP-Adapter
                    # the discriminators are the profile's (the paper's three), the world's own backbones
                    train_defaults=dict(max_steps=300, teacher_lr=1e-3, student_lr=2e-4, head_lr=1e-4,
                                        ip_adapter="none", preview_prompts=[
                                            "a photo of a {} indoors", "a photo of a {} on the beach",
                                            "a photo of a {} in the snow"])),
    "tiny": Preset("tiny", _tiny_folder, lambda: dict.fromkeys(("dino_v1", "dino_v2", "clip"), "tiny"), _tiny_concept,
                   train_defaults=dict(max_steps=150)),
}


def default_preset(name: str | None = None) -> Preset:
    """The preset ``name``, else the one ``OPAD_PRESET`` names, else ``world``; one clear error for any other."""
    where = "--preset" if name else ENV
    name = name or os.environ.get(ENV) or "world"
    if name not in PRESETS:
        raise OpadError(f"{where} {name!r} is not a preset; use one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def run_teacher(teacher: str | None, preset: str | None = None) -> str:
    """The teacher a run uses: the one it names, else its preset's (``default_preset(preset)``)."""
    return teacher or str(default_preset(preset).folder() / "teacher")
