"""The mini world's held-out concepts, laid out like DreamBench (written to a folder by
``python -m opad.world.concepts OUT``).

Each concept is one distinctive instance that no pretraining scene shows: it wears a pattern the
world never draws (checks or zigzags, :data:`opad.world.render.scenes.CONCEPT_ATTRIBUTES`), or a pattern
together with a second tone (a world scene has one or the other), in a colour off the world's
palette. Its five "photos" show it in new poses and sizes, in two or three home contexts, so that a
prompt that names another context asks for a real recontextualization (as DreamBench's photos
show a subject at home and its prompts take it elsewhere).

``OUT/<subject>/00.png`` … ``04.png`` (64 px) and ``OUT/prompts_and_classes.txt`` in DreamBench's
format: the subject→class table, then 25 object prompts (20 recontextualizations over the world's
six contexts, 5 property changes) and the same 25 as its live-subject list (the world has no live
subjects), so :func:`opad.evaluation.dreambench.read_dreambench`, ``opad.evaluation.evaluate --real OUT`` and
``opad.evaluation.reproduce --dreambench OUT`` read it unchanged. ``OUT/concepts.json`` records every photo's
scene. Everything is a pure function of this module, like the world itself.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from opad.cache import cached_folder
from opad.world.render.contexts import CONTEXTS
from opad.world.render.scenes import Scene, render, repose

PHOTOS = 5
CONCEPTS_VERSION = "world-concepts-v1"  # the cache folder's name: bump it when a concept's pixels change


@dataclass(frozen=True)
class WorldConcept:
    name: str  # the subject folder, DreamBench style
    instance: Scene  # what it is; each photo redraws pose, size, background and context
    homes: tuple[str, ...]  # the contexts its photos are taken in
    description: str

    @property
    def class_word(self) -> str:
        return self.instance.category


def _concept(name: str, homes: tuple[str, ...], description: str, **instance) -> WorldConcept:
    return WorldConcept(name, Scene(context=homes[0], **instance), homes, description)


CONCEPTS: tuple[WorldConcept, ...] = (
    _concept("checkered_mug", ("indoors", "city"), "a teal mug with white checks, steaming",
             category="mug", colour="green", rgb=(20, 150, 150), attributes=("checkered",), accent="white", variant=1),
    _concept("dotted_robot", ("indoors", "grass"), "a two-tone brown robot, yellow head and limbs, yellow dots",
             category="robot", colour="orange", rgb=(130, 80, 40), attributes=("two-tone", "dotted"), accent="yellow"),
    _concept("zigzag_ball", ("grass", "beach"), "a dark violet ball with yellow zigzags",
             category="ball", colour="purple", rgb=(95, 30, 130), attributes=("zigzag",), accent="yellow", variant=1),
    _concept("checkered_car", ("city", "snow"), "a lime car with purple checks",
             category="car", colour="yellow", rgb=(165, 205, 40), attributes=("checkered",), accent="purple"),
    _concept("striped_bird", ("grass", "snow"), "a shiny two-tone pink and blue bird with blue stripes",
             category="bird", colour="pink", rgb=(235, 100, 150), attributes=("shiny", "two-tone", "striped"),
             accent="blue", variant=1),
    _concept("zigzag_house", ("grass", "city", "snow"), "a navy house with an orange roof and orange zigzags",
             category="house", colour="blue", rgb=(35, 45, 115), attributes=("two-tone", "zigzag"), accent="orange"),
)

# 20 recontextualizations (DreamBench's first kind) and 5 property changes, {0} the token, {1} the class
_RECONTEXT_TEMPLATES = ("a {{0}} {{1}} {}", "a photo of a {{0}} {{1}} {}", "a close-up photo of a {{0}} {{1}} {}")
PROMPTS: tuple[str, ...] = (
    *[t.format(c.phrase) for t in _RECONTEXT_TEMPLATES for c in CONTEXTS.values()],
    "a photo of a small {0} {1} on the grass", "a photo of a large {0} {1} in the city",
    "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a {0} {1} with white stripes", "a {0} {1} with green dots",
)


def photo_scenes(concept: WorldConcept) -> list[Scene]:
    """The concept's photos: the instance re-posed ``PHOTOS`` times, cycling through its home contexts."""
    rng = random.Random(f"opad-world-concept:{concept.name}")
    return [repose(concept.instance, rng, context=concept.homes[k % len(concept.homes)]) for k in range(PHOTOS)]


def prompts_file() -> str:
    """``prompts_and_classes.txt`` in DreamBench's own layout (and its ``.format`` lines)."""
    lines = ["Classes", "", "subject_name,class", *[f"{c.name},{c.class_word}" for c in CONCEPTS], "", "Prompts", ""]
    listed = [f"'{p}'.format(unique_token, class_token)," for p in PROMPTS]
    listed[-1] = listed[-1].rstrip(",")
    for heading in ("Object Prompts", "Live Subject Prompts"):
        lines += [heading, "", "prompt_list = [", *listed, "]", ""]
    return "\n".join(lines)


def write_concepts(out: Path, size: int = 64) -> None:
    """Every concept's photos, the prompt file and ``concepts.json`` into the (new) folder ``out``."""
    record = {}
    for concept in CONCEPTS:
        (out / concept.name).mkdir()
        scenes = photo_scenes(concept)
        for k, scene in enumerate(scenes):
            render(scene, size).save(out / concept.name / f"{k:02d}.png")
        record[concept.name] = {"class": concept.class_word, "description": concept.description,
                                "photos": [s.to_dict() for s in scenes]}
    (out / "prompts_and_classes.txt").write_text(prompts_file())
    (out / "concepts.json").write_text(json.dumps(record, indent=2) + "\n")


def concepts_dir() -> Path:
    """The held-out concepts in the cache (``$OPAD_CACHE``), written on first use."""
    from opad.cache import cache_root

    return cached_folder(cache_root() / CONCEPTS_VERSION, write_concepts)
