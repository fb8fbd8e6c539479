"""The bundled example concept: a small toy robot, drawn procedurally (the package owns these pixels).

Five 128 px views on different backgrounds, positions and sizes, written once to the cache, so
``python -m opad.train`` has a subject to learn with no download and no third-party photos.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from opad.cache import cached_folder

EXAMPLE_VERSION = "example-robot-v1"
CLASS_NAME = "toy"
SIZE = 128
_BACKGROUNDS = [(235, 222, 200), (180, 210, 235), (205, 230, 190), (240, 200, 210), (225, 225, 225)]


def _draw_robot(draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float) -> None:
    """An orange robot with a teal visor, two antennae and blue feet: distinctive colours and shape."""
    body = (cx - 18 * s, cy - 10 * s, cx + 18 * s, cy + 22 * s)
    head = (cx - 14 * s, cy - 34 * s, cx + 14 * s, cy - 12 * s)
    draw.rounded_rectangle(body, radius=6 * s, fill=(235, 120, 30), outline=(90, 40, 10), width=max(1, int(2 * s)))
    draw.rounded_rectangle(head, radius=5 * s, fill=(245, 150, 50), outline=(90, 40, 10), width=max(1, int(2 * s)))
    draw.rectangle((cx - 10 * s, cy - 28 * s, cx + 10 * s, cy - 20 * s), fill=(20, 170, 160))
    for dx in (-8, 8):
        draw.line((cx + dx * s, cy - 34 * s, cx + dx * 1.4 * s, cy - 44 * s), fill=(60, 60, 60), width=max(1, int(2 * s)))
        draw.ellipse((cx + dx * 1.4 * s - 3 * s, cy - 47 * s, cx + dx * 1.4 * s + 3 * s, cy - 41 * s), fill=(220, 30, 40))
    draw.ellipse((cx - 6 * s, cy - 2 * s, cx + 6 * s, cy + 10 * s), fill=(250, 220, 60))
    for dx in (-11, 5):
        draw.rectangle((cx + dx * s, cy + 22 * s, cx + (dx + 6) * s, cy + 32 * s), fill=(40, 70, 200))


def draw_example_images(seed: int = 7) -> list[Image.Image]:
    rng = random.Random(seed)
    images = []
    for background in _BACKGROUNDS:
        img = Image.new("RGB", (SIZE, SIZE), background)
        draw = ImageDraw.Draw(img)
        draw.rectangle((0, int(SIZE * 0.72), SIZE, SIZE), fill=tuple(max(0, c - 40) for c in background))  # floor
        s = rng.uniform(1.1, 1.5)
        _draw_robot(draw, SIZE / 2 + rng.uniform(-18, 18), SIZE / 2 + rng.uniform(0, 14), s)
        images.append(img)
    return images


def example_concept_dir() -> Path:
    """The example images' folder in the cache (written on first use)."""
    from opad.cache import cache_root

    def write(tmp: Path) -> None:
        for i, img in enumerate(draw_example_images()):
            img.save(tmp / f"robot_{i}.png")

    return cached_folder(cache_root() / EXAMPLE_VERSION, write)
